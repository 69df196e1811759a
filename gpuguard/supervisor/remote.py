"""Snapshots from shared storage: fetched at a job's first start, and listed beside the ring's.

A job of a name another node ran (a Slurm requeue, a move by hand) should not
start from scratch. At the job's first start on this daemon, a worker thread
(`fetch-<job>`) asks the store for that name's snapshots newer than any in the
local ring, downloads the newest, checks it (`checkpoints.validate`: zip and
sha256, against the sha256 stored with it) and adds it to the ring, whose own
checks and sidecar make it the snapshot the normal path hands out. A refused
one is reported and the next older tried. The tick never waits: `ready` says
"not yet" and the job stays `starting` until the worker wakes the loop, or
until `fetch_timeout_s`, after which the job starts without it.

Lock: `_lock` guards only the map of fetches under way; the worker reads and
writes files and the store holding nothing, and touches no job state.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from gpuguard.events import EventKind
from gpuguard.health.types import Severity
from gpuguard.supervisor.checkpoints import validate
from gpuguard.supervisor.job import Job
from gpuguard.supervisor.ports import SnapshotStore, StorageUnavailable, StoredSnapshot
from gpuguard.supervisor.snapshots import SnapshotRing

log = structlog.get_logger("gpuguard.supervisor")

LIST_TIMEOUT_S = 5.0  # `snapshots NAME` waits this long for the store's listing
Say = Callable[..., None]  # JobRunner.say(job, kind, severity, message, data=...)


@dataclass(slots=True)
class _Fetch:
    job: Job
    started: float  # monotonic
    done: threading.Event = field(default_factory=threading.Event)
    abandoned: bool = False  # given up on by the tick: the worker adds nothing more


class StoredFetch:
    def __init__(self, ring: SnapshotRing, storage: SnapshotStore, fetch_dir: Path, say: Say, wake: Callable[[], None]) -> None:
        self.ring = ring
        self.storage = storage
        self.fetch_dir = fetch_dir
        self._say = say
        self._wake = wake
        self._lock = threading.Lock()
        self._fetches: dict[str, _Fetch] = {}
        for left in fetch_dir.glob(".fetch-*.pt"):  # a download the last daemon did not finish
            left.unlink(missing_ok=True)

    def ready(self, job: Job) -> bool:
        """May the job's attempt start now? Called from try_start (the tick or a request);
        never blocks. Only a job's first start looks in the store."""
        if not self.storage.configured or job.attempt.number > 0:
            return True
        with self._lock:
            fetch = self._fetches.get(job.name)
            if fetch is None or fetch.job is not job:  # a new job of that name starts a fetch of its own
                fetch = self._fetches[job.name] = _Fetch(job, time.monotonic())
                threading.Thread(target=self._run, args=(fetch,), name=f"fetch-{job.name}", daemon=True).start()
                return False
            if fetch.done.is_set():
                del self._fetches[job.name]
                return True
            if time.monotonic() - fetch.started < self.storage.fetch_timeout_s:
                return False
            fetch.abandoned = True
            del self._fetches[job.name]
        self._say(
            job, EventKind.SNAPSHOT_FETCH_FAILED, Severity.WARNING,
            f"job {job.name}: no stored snapshot within [storage] fetch_timeout_s ({self.storage.fetch_timeout_s:g}s); starting without it",
        )  # fmt: skip
        return True

    def _run(self, fetch: _Fetch) -> None:
        job = fetch.job
        try:
            self._fetch_newest(fetch)
        except StorageUnavailable as exc:
            if not fetch.abandoned:
                self._say(job, EventKind.SNAPSHOT_FETCH_FAILED, Severity.WARNING, f"job {job.name}: no stored snapshot used: {exc}; starting without one")
        except Exception:  # the job starts regardless
            log.exception("snapshot_fetch_bug", job=job.name)
        finally:
            fetch.done.set()
            self._wake()

    def _fetch_newest(self, fetch: _Fetch) -> None:
        job = fetch.job
        local = self.ring.list(job.name)
        newest_local = max((s.created for s in local), default=float("-inf"))
        have = {s.sha256 for s in local}
        stored = self.storage.stored(job.name, self.storage.fetch_timeout_s)
        for cand in [s for s in stored if s.created > newest_local and s.sha256 not in have]:
            if fetch.abandoned:
                return
            problem = self._try(fetch, cand)
            if problem is None:
                return
            self._say(
                job, EventKind.STORED_SNAPSHOT_CORRUPT, Severity.WARNING,
                f"job {job.name}: stored snapshot {cand.id} refused: {problem}; trying the next older one",
                data={"snapshot": cand.id, "url": cand.url},
            )  # fmt: skip

    def _try(self, fetch: _Fetch, cand: StoredSnapshot) -> str | None:
        """Download, check and add one stored snapshot: None when it is in the ring, else why not."""
        job = fetch.job
        self.fetch_dir.mkdir(mode=0o711, exist_ok=True)
        dest = self.fetch_dir / f".fetch-{uuid.uuid4().hex}.pt"
        started = time.monotonic()
        try:
            self.storage.fetch(cand, dest)
            check = validate(dest)
            if not check.ok:
                return check.reason
            if check.sha256 != cand.sha256:
                return f"its sha256 {check.sha256} is not the stored {cand.sha256}"
            if fetch.abandoned:
                return None
            _give_to(dest, job)
            result = self.ring.add(job.name, dest, job_user=job.spec.user, meta={"stored_id": cand.id, "fetched_from": cand.url})
        finally:
            dest.unlink(missing_ok=True)
        if result.snapshot is None:
            raise StorageUnavailable(f"the fetched snapshot {cand.id} could not be kept here: {result.reason}")
        self._say(
            job, EventKind.SNAPSHOT_FETCHED, Severity.INFO,
            f"job {job.name}: stored snapshot {cand.id} fetched from {cand.url} as snapshot {result.snapshot.id} "
            f"({time.monotonic() - started:.1f}s)",
            data={"snapshot": result.snapshot.id, "stored_id": cand.id, "url": cand.url, "size": cand.size},
        )  # fmt: skip
        return None


def _give_to(path: Path, job: Job) -> None:
    """The ring takes only what the job's user could read (it copies as that user would)."""
    user = job.spec.user
    if user is not None and user.uid != 0 and os.geteuid() == 0:
        os.chown(path, user.uid, user.gid)
    os.chmod(path, 0o600)


def listing(local: list[dict[str, Any]], storage: SnapshotStore, job: str) -> list[dict[str, Any]]:
    """`snapshots NAME`: the ring's and the store's, newest first, each with `where` it is
    kept (`local`, `stored` or `both`: the same id or sha256 in both). When the store does
    not answer in time, the local ones are shown as `local`, and a log line says why."""
    if not storage.configured:
        return [dict(s, where="local") for s in local]
    try:
        stored = storage.stored(job, LIST_TIMEOUT_S)
    except StorageUnavailable as exc:
        log.warning("stored_snapshots_not_listed", job=job, error=str(exc))
        return [dict(s, where="local") for s in local]
    matched: set[str] = set()
    out: list[dict[str, Any]] = []
    for snap in local:
        twin = next((s for s in stored if s.id == snap["id"] or s.sha256 == snap["sha256"]), None)
        if twin is not None:
            matched.add(twin.id)
        out.append(dict(snap, where="both" if twin else "local", url=twin.url if twin else None))
    for s in stored:
        if s.id not in matched:
            created = datetime.fromtimestamp(s.created, UTC).isoformat(timespec="seconds")
            out.append({
                "id": s.id, "path": None, "size": s.size, "created": created, "sha256": s.sha256,
                "source": None, "meta": {}, "valid": None, "where": "stored", "url": s.url,
            })  # fmt: skip
    return sorted(out, key=lambda s: str(s["created"]), reverse=True)
