"""Tests for gpuguard.supervisor."""
