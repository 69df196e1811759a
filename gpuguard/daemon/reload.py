"""SIGHUP: which keys of a new config apply to the running daemon."""

from __future__ import annotations

from dataclasses import replace

from gpuguard.config import Config

# Keys read once at start-up: changing them needs a restart, because they
# name the sockets, files and backend the daemon already holds open, or, for
# the checkpoint signal, what running jobs were told in their environment.
RESTART_KEYS = (
    "daemon.socket",
    "daemon.state_dir",
    "daemon.admin_group",
    "daemon.socket_mode",
    "daemon.log_format",
    "monitor.kernel_log",
    "monitor.nvml_timeout_s",
    "monitor.nvml_events",
    "jobs.checkpoint_signal",
    "jobs.snapshots_keep",
    "jobs.snapshots_max_bytes",
    "metrics.enabled",
    "metrics.address",
    "metrics.port",
    "storage.url",  # the store and its uploader are built once
    "storage.fetch_timeout_s",
    "storage.upload_retry_max_s",
)


def merge_reload(old: Config, new: Config) -> tuple[Config, list[str]]:
    """The config to run with (the new one's live keys, the old one's restart keys)
    and the keys that changed but need a restart."""
    ignored = [key for key in RESTART_KEYS if _get(old, key) != _get(new, key)]
    if new.job != old.job:
        ignored.append("[[job]]")  # config jobs are started once, at start-up
    monitor = replace(
        new.monitor,
        kernel_log=old.monitor.kernel_log,
        nvml_timeout_s=old.monitor.nvml_timeout_s,
        nvml_events=old.monitor.nvml_events,
    )
    jobs = replace(
        new.jobs,
        checkpoint_signal=old.jobs.checkpoint_signal,
        snapshots_keep=old.jobs.snapshots_keep,
        snapshots_max_bytes=old.jobs.snapshots_max_bytes,
    )
    return replace(new, daemon=old.daemon, monitor=monitor, jobs=jobs, storage=old.storage, job=old.job), ignored


def _get(config: Config, key: str) -> object:
    table, name = key.split(".")
    return getattr(getattr(config, table), name)
