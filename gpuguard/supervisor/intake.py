"""Checkpoints into snapshots: watch each job's checkpoint file, and keep a
validated copy of every complete write in the snapshot ring."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import structlog

from gpuguard.events import EventKind
from gpuguard.health.types import Severity
from gpuguard.supervisor.files import JobFiles
from gpuguard.supervisor.job import Job
from gpuguard.supervisor.snapshots import Snapshot, SnapshotCorrupt, SnapshotRing
from gpuguard.supervisor.watch import CheckpointWatcher

log = structlog.get_logger("gpuguard.supervisor")

Say = Callable[[Job, str, Severity, str], None]  # an event about a job


class CheckpointIntake:
    def __init__(
        self, ring: SnapshotRing, files: JobFiles, lookup: Callable[[str], Job | None], say: Say, persist: Callable[[Job], bool]
    ) -> None:
        self.ring = ring
        self.files = files
        self.watcher = CheckpointWatcher()
        self._lookup = lookup
        self._say = say
        self._persist = persist

    def watch(self, job: Job) -> None:
        if job.checkpoint is not None:
            self.watcher.watch(job.name, job.checkpoint, self._on_checkpoint)

    def read_checkpoint_file(self, job: Job) -> None:
        """A trainer may say where its checkpoint is (GPUGUARD_CHECKPOINT_FILE)."""
        if job.checkpoint is not None:
            return
        try:
            text = self.files.checkpoint_file(job.name).read_text(errors="replace").strip()
        except OSError:
            return
        if text and Path(text).is_absolute():
            job.attempt.checkpoint_found = text
            self.watch(job)
            self._persist(job)
            log.info("job_checkpoint_path", job=job.name, checkpoint=text)

    def _on_checkpoint(self, name: str, path: Path) -> None:
        """Watcher thread: a checkpoint write looks complete."""
        job = self._lookup(name)
        if job is not None:
            self.snapshot(job, path)

    def ingest(self, job: Job) -> None:
        """Right after the job ended: take the checkpoint it may just have written."""
        self.read_checkpoint_file(job)
        if job.checkpoint is not None and job.checkpoint.exists():
            self.snapshot(job, job.checkpoint)

    def snapshot(self, job: Job, path: Path) -> None:
        result = self.ring.add(job.name, path, job_workdir=job.spec.workdir, meta={"attempt": job.attempt.number})
        if result.saved and result.snapshot is not None:
            if job.attempt.number > job.attempt.pin_attempt:
                # newer work supersedes a rollback; a checkpoint the rolled-back attempt
                # wrote just before its stop (seen late by the watcher) does not
                job.attempt.resume_pin = None
            self._say(job, EventKind.SNAPSHOT_SAVED, Severity.INFO, f"job {job.name}: checkpoint {path} saved as snapshot {result.snapshot.id}")
        elif result.snapshot is None:
            self._say(job, EventKind.SNAPSHOT_REJECTED, Severity.WARNING, f"job {job.name}: checkpoint {path} not kept: {result.reason}")

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
