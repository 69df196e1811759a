"""Supervisor: managed training jobs."""
