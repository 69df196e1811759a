"""Health rules: pure functions from observations to a verdict per GPU."""
