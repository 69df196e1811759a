"""What the supervisor needs from the node, and nothing more.

The daemon builds a `GpuFacts` for every GPU once per tick and hands the
supervisor the ports below; the supervisor never sees the daemon, its monitor
or its store. Data flows one way: sources -> health -> the daemon's facts ->
the supervisor's decisions -> the pool's actions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
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


@dataclass(frozen=True, slots=True)
class StoredSnapshot:
    """A snapshot in the shared store, as listed there (no credentials in `url`)."""

    job: str
    id: str  # the id it had in the ring of the node that stored it
    size: int
    sha256: str
    created: float  # epoch seconds, that node's clock
    url: str  # where it is kept, e.g. s3://bucket/prefix/job/id.pt


class StorageUnavailable(Exception):
    """The store could not be reached or refused the request; the message says why
    (and never holds a credential)."""


class SnapshotStore(Protocol):
    """Shared checkpoint storage (`[storage] url`): validated snapshots are uploaded in the
    background, so a job can go on on another node. The storage package implements it."""

    @property
    def configured(self) -> bool:
        """False when no `[storage] url` is set: snapshots stay local only."""

    @property
    def fetch_timeout_s(self) -> float:
        """How long a job's first start waits for a stored snapshot before it starts without."""

    def wait_stored(self, job: str, snapshot_id: str, timeout_s: float) -> bool:
        """Block (a worker thread, never the tick) until that snapshot is in the store;
        False when the time runs out. True at once when no store is configured."""

    def offer(self, job: str, snapshot_id: str, path: Path, sha256: str, created: float) -> None:
        """A snapshot the ring just saved: queue its upload and return at once."""

    def stored(self, job: str, timeout_s: float) -> list[StoredSnapshot]:
        """The job's snapshots in the store, newest first; blocks at most `timeout_s`.
        Raises StorageUnavailable."""

    def fetch(self, snapshot: StoredSnapshot, dest: Path) -> None:
        """Download the snapshot's bytes to `dest` (blocks: a worker thread). Raises
        StorageUnavailable; the caller checks the bytes."""


class NoStorage:
    """No `[storage] url`: every snapshot counts as stored (there is nowhere else to put it)."""

    configured = False
    fetch_timeout_s = 0.0

    def wait_stored(self, job: str, snapshot_id: str, timeout_s: float) -> bool:
        return True

    def offer(self, job: str, snapshot_id: str, path: Path, sha256: str, created: float) -> None:
        return None

    def stored(self, job: str, timeout_s: float) -> list[StoredSnapshot]:
        return []

    def fetch(self, snapshot: StoredSnapshot, dest: Path) -> None:
        raise StorageUnavailable("no [storage] url is configured")


@dataclass(frozen=True, slots=True)
class BatchJob:
    """The batch scheduler's job a managed job runs in, from the environment `run`
    sent (SLURM_JOB_ID, SLURMD_NODENAME), checked by supervisor/handoff.py."""

    job_id: str
    node: str | None  # None: the scheduler knows this node by its short host name
    user: tuple[int, int, tuple[int, ...]] | None = None  # the job's (uid, gid, groups); None: the daemon's


@dataclass(frozen=True, slots=True)
class CommandResult:
    """One run of a scheduler command, as its event tells it."""

    argv: tuple[str, ...]
    exit_code: int | None  # None: it could not start or timed out
    outcome: str  # "exited 1", "timed out after 30 s and was killed", ...
    output_tail: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class Scheduler(Protocol):
    """The batch scheduler this node serves ([slurm]): a job that cannot go on here
    is handed back to it. Its commands block: called on a hand-off worker, never the tick."""

    @property
    def requeue_enabled(self) -> bool:
        """False when no requeue command is configured: jobs stay on this node."""

    @property
    def store_wait_s(self) -> float:
        """How long a hand-off waits for its newest snapshot to be stored."""

    def drain(self, job: BatchJob, reason: str) -> CommandResult | None:
        """Take this node out of the scheduler's service; None when no drain is configured."""

    def requeue(self, job: BatchJob, reason: str) -> CommandResult:
        """Put the job back in the scheduler's queue (as the job's user)."""


class NoScheduler:
    """No `[slurm] requeue`: jobs never leave the node."""

    requeue_enabled = False
    store_wait_s = 0.0

    def drain(self, job: BatchJob, reason: str) -> CommandResult | None:
        return None

    def requeue(self, job: BatchJob, reason: str) -> CommandResult:
        return CommandResult((), None, "no requeue command configured", "")


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
    standby_min_free_mb: int = 2048  # [jobs]: no warm standby starts while less memory is available
    standby_delay_s: float = 5.0  # [jobs]: ... nor before the attempt showed progress this long ago


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
    scheduler: Scheduler = NoScheduler()
