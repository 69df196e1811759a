"""The config's shape: frozen dataclasses with every key's default, and the
constants that name fixed values (`config.example.toml` documents each key).

The field types here drive the loader, so a field's hint is also its TOML type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NewType

# permission bits; the file may say "0660" (as chmod does) or the TOML octal 0o660
FileMode = NewType("FileMode", int)


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    socket: Path = Path("/run/gpuguard/gpuguard.sock")
    state_dir: Path = Path("/var/lib/gpuguard")
    # members of this group (and root) may use changing commands; the socket's group
    admin_group: str = "gpuguard"
    # the control socket's permission bits; 0o666 lets every user run read-only commands
    socket_mode: FileMode = FileMode(0o660)
    log_level: str = "info"  # debug | info | warning | error
    log_format: str = "auto"  # auto (console on a TTY, JSON otherwise) | console | json
    event_retention_days: float = 90.0
    event_retention_max_rows: int = 200_000


@dataclass(frozen=True, slots=True)
class MonitorConfig:
    poll_interval_s: float = 1.0
    hang_timeout_s: float = 300.0  # no progress and an idle GPU this long = hang
    # until an attempt's first heartbeat or checkpoint (start-up: imports, data, CUDA init)
    hang_startup_timeout_s: float = 600.0
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
    # NVML calls on a GPU past their deadline this long: the GPU is treated as lost (a wedged
    # driver or a GPU off the bus); it returns through probation once NVML answers again
    nvml_wedged_after_s: float = 10.0


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
    # a warm standby is not started while the node's available memory (psutil) is below this,
    # and a waiting one is ended below half of it
    standby_min_free_mb: int = 2048
    # ... and starts this long after the attempt's first heartbeat or checkpoint (its start-up
    # is over), so that the two do not share the CPU while the attempt sets up
    standby_delay_s: float = 5.0
    # processes gpuguard did not start that are never sent the checkpoint signal,
    # by process name (or basename of the executable or argv[0]); others get it
    # only when they handle it (/proc/PID/status SigCgt)
    foreign_never_signal: tuple[str, ...] = (
        "nv-hostengine",
        "dcgm-exporter",
        "dcgmi",
        "nvidia-persistenced",
        "nvidia-smi",
        "nvidia-fabricmanager",
        "nv-fabricmanager",
    )


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Prometheus exposition; off by default and bound to localhost when on."""

    enabled: bool = False
    address: str = "127.0.0.1"
    port: int = 9402


@dataclass(frozen=True, slots=True)
class HooksConfig:
    """Commands run when the node turns unhealthy or recovers: argv lists
    with placeholders ({hostname}, {reason}, {gpus}, {uuids}, {state}), never a shell string."""

    on_unhealthy: tuple[str, ...] = ()
    on_recovered: tuple[str, ...] = ()
    timeout_s: float = 30.0


@dataclass(frozen=True, slots=True)
class SlurmConfig:
    """Handing a job that cannot go on here back to Slurm: argv lists with
    placeholders ({node}, {job_id}, {reason}), never a shell string; empty = off.
    `drain` runs only as part of a hand-off, so it needs `requeue`."""

    drain: tuple[str, ...] = ()
    requeue: tuple[str, ...] = ()
    # the Slurm node names of this host (several slurmd on one host); empty: its short
    # name. `drain` takes only one of these, whatever SLURMD_NODENAME a job was started with
    nodes: tuple[str, ...] = ()
    timeout_s: float = 30.0  # each command's limit
    # how long a hand-off waits for the newest snapshot to reach [storage] before it
    # requeues anyway (the next node then resumes from an older stored one)
    store_wait_s: float = 300.0


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """Shared checkpoint storage: every validated snapshot is also uploaded here, so a job
    can resume on another node. S3 endpoint and credentials come from the standard AWS
    environment and config files, never from this file (it would hold a secret)."""

    url: str = ""  # s3://BUCKET/PREFIX or file:///shared/path; empty: local snapshots only
    fetch_timeout_s: float = 300.0  # a job's first start waits this long for a stored snapshot
    upload_retry_max_s: float = 60.0  # the longest back-off between upload retries while the store is down


@dataclass(frozen=True, slots=True)
class JobEntry:
    """One `[[job]]` table: the blueprint of a managed job."""

    name: str
    command: tuple[str, ...] = ()
    # instead of a command: `gpuguard-yolo train` with these arguments (KEY = value);
    # save_every_s among them is gpuguard-yolo's own --save-every-s
    yolo: tuple[tuple[str, str], ...] = ()
    workdir: Path | None = None
    env: tuple[tuple[str, str], ...] = ()
    user: str | None = None
    gpus: int = 1
    min_gpus: int | None = None
    checkpoint: Path | None = None
    max_restarts: int | None = None  # None: [jobs] max_restarts
    # keep a warm standby of the next attempt (it must call gpuguard.job.wait_until_started);
    # None: on for a `yolo` job, off for a command
    standby: bool | None = None


@dataclass(frozen=True, slots=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    reset: ResetConfig = field(default_factory=ResetConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    job: tuple[JobEntry, ...] = ()
    source: Path | None = None  # the file it came from; None for built-in defaults


# the values daemon.log_level and daemon.log_format may take
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "console", "json")
# variables gpuguard sets for every job (CONTRACT.md); a [[job]] env cannot set them
RESERVED_ENV = "CUDA_VISIBLE_DEVICES"
YOLO_SAVE_EVERY = "save_every_s"  # in [[job]] yolo = {...}: gpuguard-yolo's --save-every-s, not a `yolo train` key
