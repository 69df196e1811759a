"""What the supervisor needs from the node, and nothing more.

The daemon builds a `GpuFacts` for every GPU once per tick and hands the
supervisor the ports below; the supervisor never sees the daemon, its monitor
or its store. Data flows one way: sources -> health -> the daemon's facts ->
the supervisor's decisions -> the pool's actions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gpuguard.events import Event
from gpuguard.health.types import Action, GpuState


@dataclass(frozen=True, slots=True)
class GpuFacts:
    """One GPU as the supervisor sees it this tick."""

    uuid: str
    state: GpuState  # the effective state (exclusion and reset over health)
    action: Action  # the health verdict's recommended action
    reason: str | None
    # restart-the-app Xids still active on it, as (xid, timestamp): each is acted on once
    app_xids: tuple[tuple[int, float], ...] = ()
    index: int = -1
    util_pct: float | None = None  # None: NVML did not say (a wedged or lost GPU)
    holders: tuple[int, ...] = ()  # pids NVML lists on it
    excluded_by: str | None = None  # who quarantined it, None when it is in the pool
    health: GpuState | None = None  # the health verdict alone; None before the first sample
    suspect: bool = False  # a job hung on it: placement avoids it while other GPUs are free


Facts = Mapping[str, GpuFacts]  # by uuid, in index order


class GpuPool(Protocol):
    """The node's GPUs as a shared resource: the supervisor asks, the pool decides and acts."""

    def exclude(self, uuid: str, reason: str) -> None:
        """Take a GPU out of the pool (no-op when it is out already)."""

    def reset_when_free(self, uuid: str, by: str) -> None:
        """Reset the GPU once no process holds it; probation follows a good reset."""

    def node_unhealthy(self, reason: str) -> None:
        """The node itself needs attention (a reboot-class fault)."""

    def job_hung(self, job: str, uuids: Sequence[str]) -> None:
        """A job hung on these GPUs: the pool decides what that says about them."""

    def refresh(self) -> None:
        """Ask for fresh GPU facts soon (a poll now, not at the next interval)."""

    def occupied(self, uuid: str, pid: int) -> None:
        """A job's process now runs on this GPU (the simulator shows it as a holder)."""

    def vacated(self, uuid: str, pid: int) -> None:
        """A job's process left this GPU."""


class JobRecords(Protocol):
    """Where job records survive a daemon restart."""

    def jobs(self) -> list[dict[str, Any]]: ...

    def put_job(self, name: str, record: dict[str, Any]) -> None: ...


class SnapshotStore(Protocol):
    """Shared checkpoint storage (`[storage] url`): validated snapshots are uploaded in the
    background, so a job can go on on another node. The storage package implements it."""

    @property
    def configured(self) -> bool:
        """False when no `[storage] url` is set: snapshots stay local only."""

    def wait_stored(self, job: str, snapshot_id: str, timeout_s: float) -> bool:
        """Block (a worker thread, never the tick) until that snapshot is in the store;
        False when the time runs out. True at once when no store is configured."""


class NoStorage:
    """No `[storage] url`: every snapshot counts as stored (there is nowhere else to put it)."""

    configured = False

    def wait_stored(self, job: str, snapshot_id: str, timeout_s: float) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class Settings:
    """The live settings the supervisor reads (a SIGHUP reload changes them);
    the daemon builds them from [jobs] and [monitor]."""

    checkpoint_signal: str
    checkpoint_grace_s: float
    stop_timeout_s: float
    max_restarts: int
    backoff_initial_s: float
    backoff_max_s: float
    stable_after_s: float
    migrate_on_degraded: bool
    foreign_never_signal: tuple[str, ...]
    hang_timeout_s: float
    hang_startup_timeout_s: float
    hang_idle_util_pct: float


@dataclass(frozen=True, slots=True)
class Ports:
    """Everything the supervisor is handed."""

    pool: GpuPool
    record: Callable[[Event], Event]  # store an event and log it
    records: JobRecords
    wake: Callable[[], None]  # run the main loop's tick now (a stop finished)
    settings: Callable[[], Settings]
    # fresh facts for requests that arrive between ticks; it takes the daemon's lock,
    # so it is never called under the supervisor's (the tick holds them in that order)
    facts: Callable[[], Facts]
    storage: SnapshotStore = NoStorage()
