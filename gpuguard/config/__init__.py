"""The daemon's configuration: TOML in, a frozen typed Config out.

`schema` holds the dataclasses and their defaults, `loading` turns a file into
them, `checks` holds the semantic checks. This package re-exports what the rest
of gpuguard imports, so callers keep writing `from gpuguard.config import ...`.
"""

from gpuguard.config.checks import unsafe_owner_or_mode
from gpuguard.config.loading import ConfigError, load, with_overrides
from gpuguard.config.schema import (
    YOLO_SAVE_EVERY,
    Config,
    DaemonConfig,
    HealthConfig,
    HooksConfig,
    JobEntry,
    JobsConfig,
    MetricsConfig,
    MonitorConfig,
    ResetConfig,
    SlurmConfig,
    StorageConfig,
)

__all__ = [
    "YOLO_SAVE_EVERY",
    "Config",
    "ConfigError",
    "DaemonConfig",
    "HealthConfig",
    "HooksConfig",
    "JobEntry",
    "JobsConfig",
    "MetricsConfig",
    "MonitorConfig",
    "ResetConfig",
    "SlurmConfig",
    "StorageConfig",
    "load",
    "unsafe_owner_or_mode",
    "with_overrides",
]
