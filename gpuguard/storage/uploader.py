"""The supervisor's `SnapshotStore` port: snapshots uploaded on a thread of their own.

`offer` (called right after the ring saved a snapshot) only queues; the
`storage-upload` thread uploads one snapshot at a time, oldest first, so the
tick, the checkpoint threads and the job never wait for the store. A store that
is down holds the queue: the same snapshot is retried with exponential back-off
(up to `[storage] upload_retry_max_s`), one `storage_unavailable` event says so
and `storage_recovered` says when it is back; an upload cut off mid-way (a
server killed) is simply done again. After each upload the job's stored
snapshots beyond the ring's `keep_newest` are deleted. A snapshot whose sha256
is already stored for the job (fetched from there, or uploaded before a daemon
restart) is not uploaded again.

Lock: `_cond` guards the queue and the stored/dropped sets only; no store call
and no event is made under it. The thread takes no other lock.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

from gpuguard.events import Event, EventKind
from gpuguard.health.types import Severity
from gpuguard.storage.objects import SUFFIX, ObjectStore
from gpuguard.supervisor.ports import StoredSnapshot, StorageUnavailable

log = structlog.get_logger("gpuguard.storage")

T = TypeVar("T")
Record = Callable[[Event], Event]


@dataclass(frozen=True, slots=True)
class _Pending:
    job: str
    id: str
    path: Path
    sha256: str
    created: float


class Uploader:
    """Background uploads into one store, and the blocking reads the supervisor's workers make."""

    configured = True

    def __init__(
        self,
        store: ObjectStore,
        record: Record,
        *,
        keep_newest: int,
        fetch_timeout_s: float,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 60.0,
    ) -> None:
        self.store = store
        self.fetch_timeout_s = fetch_timeout_s
        self._record = record
        self._keep = keep_newest
        self._retry = (retry_initial_s, max(retry_initial_s, retry_max_s))
        self._cond = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._stored: set[tuple[str, str]] = set()  # (job, snapshot id) known to be in the store
        self._dropped: set[tuple[str, str]] = set()  # gone locally before its upload: never stored
        self._down: str | None = None  # why the store is unavailable; None while it works
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="storage-upload", daemon=True)

    # --- the port ------------------------------------------------------------
    def offer(self, job: str, snapshot_id: str, path: Path, sha256: str, created: float) -> None:
        with self._cond:
            if (job, snapshot_id) in self._stored or any((p.job, p.id) == (job, snapshot_id) for p in self._queue):
                return
            self._queue.append(_Pending(job, snapshot_id, path, sha256, created))
            self._cond.notify_all()

    def wait_stored(self, job: str, snapshot_id: str, timeout_s: float) -> bool:
        """Waits for the upload; a snapshot not offered in this daemon's life is looked up in the store."""
        key = (job, snapshot_id)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            known = key in self._stored or key in self._dropped or any((p.job, p.id) == key for p in self._queue)
        if not known:
            try:
                if any(s.id == snapshot_id for s in self.stored(job, timeout_s)):
                    with self._cond:
                        self._stored.add(key)
            except StorageUnavailable as exc:
                log.info("storage_lookup_failed", job=job, snapshot=snapshot_id, error=str(exc))
        with self._cond:
            self._cond.wait_for(lambda: key in self._stored or key in self._dropped, max(0.0, deadline - time.monotonic()))
            return key in self._stored

    def stored(self, job: str, timeout_s: float) -> list[StoredSnapshot]:
        return within(timeout_s, f"[storage] url {self.store.url}: no answer", lambda: self.store.list(job))

    def fetch(self, snapshot: StoredSnapshot, dest: Path) -> None:
        self.store.get(snapshot, dest)

    # --- views and life ------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """For `status`: the url (it never holds credentials), and whether uploads wait."""
        with self._cond:
            pending = len(self._queue)
        return {"url": str(self.store.url), "available": self._down is None, "problem": self._down, "pending_uploads": pending}

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Daemon stop: an upload under way is cut off (the next daemon uploads again)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def unavailable(self, reason: str, job: str | None = None) -> None:
        """The store failed: one event per outage, a log line per retry."""
        if self._down is None:
            self._down = reason
            self._record(Event(
                kind=EventKind.STORAGE_UNAVAILABLE, severity=Severity.WARNING, job=job,
                message=f"shared storage unavailable: {reason}; uploads wait and are retried, training and local snapshots go on",
                data={"url": str(self.store.url)},
            ))  # fmt: skip
        else:
            log.info("storage_still_unavailable", url=str(self.store.url), error=reason)

    # --- the thread ----------------------------------------------------------
    def _run(self) -> None:
        delays = retry_delays(*self._retry)
        delay = next(delays)
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stopping)
                if self._stopping:
                    return
                item = self._queue[0]
            try:
                done = self._upload(item)
            except Exception:  # a bug must not end uploads for the daemon's life
                log.exception("storage_upload_bug", job=item.job, snapshot=item.id)
                done = False
            if done:
                with self._cond:
                    self._queue.popleft()
                    self._cond.notify_all()
                delays = retry_delays(*self._retry)
                delay = next(delays)
                continue
            with self._cond:
                self._cond.wait_for(lambda: self._stopping, delay)
            delay = next(delays)

    def _upload(self, item: _Pending) -> bool:
        """True when the item is finished with (stored, or gone locally); False: retry later."""
        key = (item.job, item.id)
        if not item.path.exists():
            log.info("snapshot_gone_before_upload", job=item.job, snapshot=item.id)
            with self._cond:
                self._dropped.add(key)
            return True
        try:
            listed = self.store.list(item.job)
            same = next((s for s in listed if s.sha256 == item.sha256), None)
            started = time.monotonic()
            if same is None:
                self.store.put(item.job, item.id, item.path, item.sha256, item.created)
        except StorageUnavailable as exc:
            self.unavailable(str(exc), item.job)
            return False
        took = time.monotonic() - started
        with self._cond:
            self._stored.add(key)
        self._recovered()
        if same is not None:
            log.info("snapshot_already_stored", job=item.job, snapshot=item.id, stored_as=same.id)
            return True
        size = item.path.stat().st_size if item.path.exists() else None
        where = self.store.url.where(item.job, f"{item.id}{SUFFIX}")
        self._record(Event(
            kind=EventKind.SNAPSHOT_UPLOADED, severity=Severity.INFO, job=item.job,
            message=f"job {item.job}: snapshot {item.id} stored in {where} ({took:.1f}s)",
            data={"snapshot": item.id, "url": where, "size": size, "seconds": round(took, 3)},
        ))  # fmt: skip
        self._retain(item.job)
        return True

    def _recovered(self) -> None:
        if self._down is not None:
            was, self._down = self._down, None
            self._record(Event(
                kind=EventKind.STORAGE_RECOVERED, severity=Severity.INFO,
                message=f"shared storage {self.store.url} works again (was: {was})", data={"url": str(self.store.url)},
            ))  # fmt: skip

    def _retain(self, job: str) -> None:
        """The store keeps what the ring keeps: the newest `keep_newest` of the job."""
        try:
            for old in self.store.list(job)[self._keep :]:
                self.store.delete(job, old.id)
                log.info("stored_snapshot_pruned", job=job, snapshot=old.id)
        except StorageUnavailable as exc:  # the next upload prunes again
            log.warning("stored_snapshot_prune_failed", job=job, error=str(exc))


def retry_delays(initial_s: float, max_s: float) -> Iterator[float]:
    """Exponential back-off: initial, doubling, then max_s for as long as it takes."""
    delay = initial_s
    while True:
        yield delay
        delay = min(delay * 2, max_s)


def within(timeout_s: float, what: str, call: Callable[[], T]) -> T:
    """Run a store call on a helper thread and wait at most `timeout_s` (a hung NFS mount
    or a silent endpoint must not hold a socket thread); StorageUnavailable past it."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:
            box["error"] = exc

    helper = threading.Thread(target=run, name="storage-call", daemon=True)
    helper.start()
    helper.join(timeout_s)
    if helper.is_alive():
        raise StorageUnavailable(f"{what} within {timeout_s:g}s")
    if "error" in box:
        raise box["error"]
    return box["value"]
