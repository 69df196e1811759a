"""Trainer-side integrations: code that runs inside a managed job's process.

The daemon never imports this package; heavy imports (torch, ultralytics)
stay inside its modules' functions so that importing it is cheap.
"""
