"""Checkpoints into snapshots: watch each job's checkpoint file, and keep a
validated copy of every complete write in the snapshot ring.

Everything here is read on behalf of a job, so a path the job controls is
never trusted: the file a trainer names its checkpoint in is read only when
it is a small regular file of the job's user (no symlink followed, no wait
on a FIFO), and a checkpoint is taken only when the job's user could read it
(`snapshot_files`). A copy runs on the watcher's callback thread; `ingest`,
called from the tick, is a stat when that write was already taken, and waits
for a copy of that very write already under way rather than making a second.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import structlog

from gpuguard.events import EventKind
from gpuguard.health.types import Severity
from gpuguard.supervisor.files import JobFiles
from gpuguard.supervisor.job import Job
from gpuguard.supervisor.ports import NoStorage, SnapshotStore
from gpuguard.supervisor.snapshot_files import SourceRefused, read_small
from gpuguard.supervisor.snapshots import Snapshot, SnapshotCorrupt, SnapshotRing
from gpuguard.supervisor.states import FINAL
from gpuguard.supervisor.watch import CheckpointWatcher

log = structlog.get_logger("gpuguard.supervisor")

Say = Callable[[Job, str, Severity, str], None]  # an event about a job
Identity = tuple[int, int, int, int]  # (device, inode, size, mtime_ns): one write of a file
CHECKPOINT_FILE_MAX = 4096  # bytes; the file holds one path


class CheckpointIntake:
    def __init__(
        self,
        ring: SnapshotRing,
        files: JobFiles,
        lookup: Callable[[str], Job | None],
        say: Say,
        persist: Callable[[Job], bool],
        storage: SnapshotStore = NoStorage(),
    ) -> None:
        self.ring = ring
        self.storage = storage  # each snapshot saved is offered for upload ([storage] url)
        self.files = files
        self.watcher = CheckpointWatcher()
        self._lookup = lookup
        self._say = say
        self._persist = persist
        self._refused: dict[str, Identity] = {}  # job -> its checkpoint-path file last ignored
        self._taken: dict[str, Identity] = {}  # job -> the checkpoint write last found in the ring
        self._copying: dict[str, Identity] = {}  # job -> the write being copied now
        self._copied = threading.Condition()  # guards both; notified when a copy ends

    def watch(self, job: Job) -> None:
        """Follow the job's checkpoint from now on (a new job, or a path just named)."""
        self._taken.pop(job.name, None)
        if job.checkpoint is not None:
            self.watcher.watch(job.name, job.checkpoint, self._on_checkpoint)

    def read_checkpoint_file(self, job: Job) -> None:
        """A trainer may say where its checkpoint is (GPUGUARD_CHECKPOINT_FILE).

        Never blocks: anything but a small regular file of the job's user holding
        one absolute path is ignored, logged once per write of the file.
        """
        if job.checkpoint is not None:
            return
        path = self.files.checkpoint_file(job.name)
        seen = _identity(path)
        if seen is None or self._refused.get(job.name) == seen:
            return
        owner = job.spec.user.uid if job.spec.user is not None else None
        try:
            text = read_small(path, owner, CHECKPOINT_FILE_MAX).decode(errors="replace").strip()
            if not text:
                return  # not written yet
            if not Path(text).is_absolute() or "\x00" in text or "\n" in text:
                raise SourceRefused("not one absolute path")
        except FileNotFoundError:
            return
        except SourceRefused as exc:
            self._refused[job.name] = seen
            log.warning("job_checkpoint_file_ignored", job=job.name, path=str(path), reason=str(exc))
            return
        job.attempt.checkpoint_found = text
        self.watch(job)
        self._persist(job)
        log.info("job_checkpoint_path", job=job.name, checkpoint=text)

    def _on_checkpoint(self, name: str, path: Path) -> None:
        """The watcher's callback thread: a checkpoint write looks complete."""
        job = self._lookup(name)
        # a job over on this node (requeued to another, finished, stopped) writes nothing
        # more here: a shared run directory may hold the next node's checkpoints
        if job is not None and job.state not in FINAL and _identity(path) != self._taken.get(name):
            self.snapshot(job, path)

    def ingest(self, job: Job) -> None:
        """Right after the job ended: take the checkpoint it may just have written.

        Only a stat when the watcher (or an earlier ingest) already has that
        write in the ring; otherwise the copy runs on the caller's thread.
        """
        self.read_checkpoint_file(job)
        path = job.checkpoint
        if path is not None and _identity(path) not in (None, self._taken.get(job.name)):
            self.snapshot(job, path)

    def snapshot(self, job: Job, path: Path) -> None:
        """Hand one write of the checkpoint to the ring, as the job's user could read it; if another
        thread is copying that same write, wait for it instead (a restart waits for this copy)."""
        seen = _identity(path)
        with self._copied:
            while seen is not None and self._copying.get(job.name) == seen:
                self._copied.wait()
            if seen is not None and self._taken.get(job.name) == seen:
                return  # the other thread took it
            if seen is not None:
                self._copying[job.name] = seen
        result = None
        try:
            result = self.ring.add(
                job.name, path, job_workdir=job.spec.workdir, job_user=job.spec.user, meta={"attempt": job.attempt.number}
            )
        finally:
            with self._copied:
                if seen is not None and self._copying.get(job.name) == seen:
                    del self._copying[job.name]
                if seen is not None and result is not None and result.snapshot is not None:  # saved, or unchanged
                    self._taken[job.name] = seen
                self._copied.notify_all()
        if result.saved and result.snapshot is not None:
            if job.attempt.number > job.attempt.pin_attempt:
                # newer work supersedes a rollback; a checkpoint the rolled-back attempt
                # wrote just before its stop (seen late by the watcher) does not
                job.attempt.resume_pin = None
            self._say(job, EventKind.SNAPSHOT_SAVED, Severity.INFO, f"job {job.name}: checkpoint {path} saved as snapshot {result.snapshot.id}")
            snap = result.snapshot
            self.storage.offer(job.name, snap.id, snap.path, snap.sha256, snap.created)  # queued, never waited for
        elif result.snapshot is None:
            self._say(job, EventKind.SNAPSHOT_REJECTED, Severity.WARNING, f"job {job.name}: checkpoint {path} not kept: {result.reason}")

    def offer_newest(self, jobs: Iterable[Job]) -> None:
        """At daemon start: each job's newest snapshot again, in case the last daemon stopped
        before it was stored (the uploader skips content the store already has)."""
        for job in jobs:
            snap = self.ring.newest(job.name)
            if snap is not None:
                self.storage.offer(job.name, snap.id, snap.path, snap.sha256, snap.created)

    def resume_from(self, job: Job) -> str | None:
        """The snapshot the next attempt starts from: a rollback's pin, else the newest valid.
        Every candidate is verified; a broken one is skipped with an event."""

        def skipped(snap: Snapshot, reason: str) -> None:
            self._say(job, EventKind.SNAPSHOT_CORRUPT, Severity.WARNING, f"job {job.name}: snapshot {snap.id} skipped: {reason}")

        pin = job.attempt.resume_pin
        if pin:
            try:
                pinned = self.ring.get(job.name, Path(pin).stem)
            except SnapshotCorrupt as exc:
                skipped(exc.snapshot, exc.reason)
                pinned = None
            if pinned is not None:
                return str(pinned.path)
        snap = self.ring.newest_valid(job.name, on_corrupt=skipped)
        return str(snap.path) if snap else None

    def close(self) -> None:
        self.watcher.stop()


def _identity(path: Path) -> Identity | None:
    """Which write of the file is there now, without following a symlink; None when absent."""
    try:
        st = os.lstat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
