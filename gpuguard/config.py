"""The daemon's configuration: TOML in, a frozen typed Config out.

Every key has a default here; `config.example.toml` documents each one.
Unknown keys and wrong types are errors that name the file, the key and what
is wrong (`ConfigError`), so a typo never silently falls back to a default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CONFIG_PATH = Path("/etc/gpuguard/config.toml")


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    socket: Path = Path("/run/gpuguard/gpuguard.sock")
    state_dir: Path = Path("/var/lib/gpuguard")
    # members of this group (and root) may use changing commands; the socket's group
    admin_group: str = "gpuguard"
    log_level: str = "info"  # debug | info | warning | error
    log_format: str = "auto"  # auto (console on a TTY, JSON otherwise) | console | json
    event_retention_days: float = 90.0
    event_retention_max_rows: int = 200_000


@dataclass(frozen=True, slots=True)
class MonitorConfig:
    poll_interval_s: float = 1.0
    hang_timeout_s: float = 300.0  # no progress and an idle GPU this long = hang
    hang_idle_util_pct: int = 5  # at or below this utilisation a GPU counts as idle
    nvml_timeout_s: float = 2.0  # deadline for one poll of all GPUs
    kernel_log: Path = Path("/dev/kmsg")
    nvml_events: bool = True


@dataclass(frozen=True, slots=True)
class HealthConfig:
    temperature_degraded_c: int = 87
    temperature_faulted_c: int = 95
    # corrected (single-bit) ECC errors per hour, from the volatile counter
    ecc_corrected_rate_degraded_per_h: float = 100.0
    retired_pages_degraded: int = 48  # SBE + DBE retired pages
    hw_slowdown_degraded_s: float = 60.0  # HW slowdown/power brake held this long
    restart_app_window_s: float = 120.0  # how long a restart-the-app Xid stays active


@dataclass(frozen=True, slots=True)
class ResetConfig:
    # argv; {uuid}, {index} and {pci_bus_id} are replaced, never through a shell
    command: tuple[str, ...] = ("nvidia-smi", "--gpu-reset", "-i", "{uuid}")
    timeout_s: float = 120.0
    max_per_gpu_per_day: int = 3
    probation_s: float = 60.0


@dataclass(frozen=True, slots=True)
class JobsConfig:
    checkpoint_signal: str = "SIGUSR1"
    checkpoint_grace_s: float = 60.0
    stop_timeout_s: float = 30.0
    max_restarts: int = 10
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 300.0
    stable_after_s: float = 600.0  # a run this long resets the crash backoff
    migrate_on_degraded: bool = True
    snapshots_keep: int = 5
    snapshots_max_bytes: int = 20 * 1024**3


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One `[[job]]` table: the blueprint of a managed job."""

    name: str
    command: tuple[str, ...]
    workdir: Path | None = None
    env: tuple[tuple[str, str], ...] = ()
    user: str | None = None
    gpus: int = 1
    min_gpus: int | None = None
    checkpoint: Path | None = None
    max_restarts: int | None = None  # None: [jobs] max_restarts


@dataclass(frozen=True, slots=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    reset: ResetConfig = field(default_factory=ResetConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    job: tuple[JobSpec, ...] = ()
    source: Path | None = None  # the file it came from; None for built-in defaults


class ConfigError(ValueError):
    """A config problem, worded for the operator: file, key, what is wrong."""

    def __init__(self, path: Path | str | None, key: str | None, problem: str) -> None:
        where = str(path) if path else "<config>"
        super().__init__(f"{where}: {key}: {problem}" if key else f"{where}: {problem}")
        self.path = path
        self.key = key
        self.problem = problem
