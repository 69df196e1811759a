"""What gpuguard remembers: one Event per thing that happened, in the shape
`gpuguardctl events --json` shows (CONTRACT.md)."""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from gpuguard.health.types import Severity


class EventKind(enum.StrEnum):
    """The kinds gpuguard writes. Event.kind stays a plain str, so a new kind
    needs no schema change and old databases with unknown kinds still load."""

    # the contract's kinds
    XID = "xid"
    ECC = "ecc"
    REMAP = "remap"
    HANG = "hang"
    GPU_LOST = "gpu_lost"
    THERMAL = "thermal"
    GPU_EXCLUDED = "gpu_excluded"
    GPU_INCLUDED = "gpu_included"
    GPU_RESET = "gpu_reset"
    JOB_STARTED = "job_started"
    CHECKPOINT_REQUESTED = "checkpoint_requested"
    JOB_RESTARTED = "job_restarted"
    JOB_SUCCEEDED = "job_succeeded"
    JOB_FAILED = "job_failed"
    JOB_STOPPED = "job_stopped"
    # gpuguard's own
    NVML_TIMEOUT = "nvml_timeout"
    NVML_WEDGED = "nvml_wedged"  # NVML past its deadline for [health] nvml_wedged_after_s: treated as lost
    NVML_ERROR = "nvml_error"
    # health findings with no contract kind of their own
    GPU_RESET_REQUIRED = "gpu_reset_required"  # NVML's ResetRequired
    NO_DATA = "no_data"  # no snapshot of the GPU this time
    RECOVERY_ACTION = "recovery_action"  # the driver's GPU recovery-action field
    DAEMON_STARTED = "daemon_started"
    DAEMON_STOPPED = "daemon_stopped"
    GPU_RECOVERED = "gpu_recovered"
    JOB_WAITING = "job_waiting"
    JOB_CRASHED = "job_crashed"
    JOB_RESTART_REQUESTED = "job_restart_requested"  # exit 75 nobody asked for
    JOB_ADOPTED = "job_adopted"  # a new daemon found the job's process running
    JOB_STOPPING_DONE = "job_stopping_done"  # stopped for a restart
    JOB_STOP_INCOMPLETE = "job_stop_incomplete"  # processes survived SIGKILL
    JOB_LEFTOVERS_STOPPED = "job_leftovers_stopped"  # an attempt ended, its stray processes were stopped
    GPU_NOT_RELEASED = "gpu_not_released"  # a restart started while NVML still listed the old attempt
    # a warm standby (supervisor/standby.py): the next attempt, started early without GPUs
    STANDBY_STARTED = "standby_started"
    STANDBY_DIED = "standby_died"  # it ended while it waited: replaced with back-off
    STANDBY_PROMOTED = "standby_promoted"  # handed the GPUs: it is the new attempt
    STANDBY_SKIPPED = "standby_skipped"  # available memory below [jobs] standby_min_free_mb (or a waiting one ended below half)
    GPU_PROBATION_FAILED = "gpu_probation_failed"
    GPU_SUSPECT = "gpu_suspect"  # a job hung on it, no GPU-side evidence: avoided, not excluded
    GPU_SUSPICION_LIFTED = "gpu_suspicion_lifted"
    SNAPSHOT_SAVED = "snapshot_saved"
    SNAPSHOT_REJECTED = "snapshot_rejected"
    SNAPSHOT_CORRUPT = "snapshot_corrupt"  # a kept snapshot no longer matches its sha256: skipped
    # shared checkpoint storage ([storage] url)
    SNAPSHOT_UPLOADED = "snapshot_uploaded"
    STORAGE_UNAVAILABLE = "storage_unavailable"  # once per outage: uploads wait and are retried
    STORAGE_RECOVERED = "storage_recovered"
    SNAPSHOT_FETCHED = "snapshot_fetched"  # a job's first start got a stored snapshot newer than any local one
    STORED_SNAPSHOT_CORRUPT = "stored_snapshot_corrupt"  # refused (sha256 or zip); the next older one is tried
    SNAPSHOT_FETCH_FAILED = "snapshot_fetch_failed"  # no stored snapshot in time: the job starts without
    NODE_HOOK = "node_hook"
    # a process gpuguard did not start holds a faulted GPU and was left unsignalled
    FOREIGN_NOT_SIGNALLED = "foreign_not_signalled"
    # a managed job does not handle its checkpoint signal: it was stopped without one
    CHECKPOINT_UNSUPPORTED = "checkpoint_unsupported"
    # the database was lost or corrupt at start: jobs and quarantine rebuilt from the records files
    STATE_REBUILT = "state_rebuilt"
    # handing a job back to Slurm ([slurm]): it cannot go on on this node
    JOB_HANDOFF = "job_handoff"  # stopped with its checkpoint; being handed back
    HANDOFF_UNSTORED = "handoff_unstored"  # its newest snapshot was not stored in time: requeued anyway
    NODE_DRAINED = "node_drained"
    SLURM_DRAIN_FAILED = "slurm_drain_failed"
    JOB_REQUEUED = "job_requeued"  # the scheduler took it back; it ends on this node
    SLURM_REQUEUE_FAILED = "slurm_requeue_failed"  # it stays here, waiting for healthy GPUs


# keys of to_json() that an event's `data` may not replace
RESERVED_KEYS = frozenset({"id", "ts", "kind", "severity", "gpu", "job", "message", "xid"})


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened. `data` holds JSON-able extras; it is copied
    into a read-only mapping and left out of ==/hash, so events stay hashable.
    `id` is None until the store has written the event."""

    kind: str
    severity: Severity
    message: str
    gpu: str | None = None
    job: str | None = None
    xid: int | None = None
    data: Mapping[str, Any] = field(default_factory=dict, compare=False)
    ts: float = field(default_factory=time.time)
    id: int | None = None

    def __post_init__(self) -> None:
        # a StrEnum kind would print as "EventKind.XID" in some f-strings; keep it plain
        object.__setattr__(self, "kind", str(self.kind))
        object.__setattr__(self, "severity", Severity(self.severity))
        if not isinstance(self.data, MappingProxyType):
            object.__setattr__(self, "data", MappingProxyType(dict(self.data)))

    def to_json(self) -> dict[str, Any]:
        """The contract's event object: fixed keys first, then `data`'s keys
        (which never replace a fixed key); `xid` only when set."""
        out: dict[str, Any] = {
            "id": self.id,
            "ts": iso_utc(self.ts),
            "kind": self.kind,
            "severity": self.severity.value,
            "gpu": self.gpu,
            "job": self.job,
            "message": self.message,
        }
        if self.xid is not None:
            out["xid"] = self.xid
        out.update((k, v) for k, v in self.data.items() if k not in RESERVED_KEYS)
        return out


def iso_utc(ts: float) -> str:
    """`2026-11-27T07:15:03.123Z`: ISO-8601, UTC, milliseconds."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
