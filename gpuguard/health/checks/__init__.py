"""One small module per health check, all behind the interface in `base`."""
