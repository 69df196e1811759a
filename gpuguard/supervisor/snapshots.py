"""A per-job ring of validated checkpoint copies, so a restart never gets a torn file.

The trainer's own `last.pt` may be mid-rewrite at any moment; the ring keeps
copies that passed validation twice (the source, then the copy, since the
source can change during the copy), renamed into place only when complete.
Layout: `root/<job>/<UTC time>-<seq>-<sha8>.pt` plus a `.json` sidecar with
the same stem. A crash leaves at most a `.tmp-*` file or a sidecar without
its snapshot; both are cleaned when the ring is opened. A snapshot is checked
again against its sidecar (size, sha256, zip) each time it is handed out to
resume or roll back from (`snapshot_check.py`); retention is `retention.py`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from gpuguard.contract import valid_job_name
from gpuguard.supervisor.checkpoints import CheckpointCheck, precheck, validate_fd
from gpuguard.supervisor.process import UserSpec
from gpuguard.supervisor.retention import select_retained
from gpuguard.supervisor.snapshot_check import OK, SnapshotChecks
from gpuguard.durable import fsync_dir, write_synced
from gpuguard.supervisor.snapshot_files import CHANGED_WHILE_COPYING, SourceRefused, copy_validated, open_source

log = structlog.get_logger(__name__)

SNAPSHOT_ID = re.compile(r"^\d{8}T\d{6}Z-(\d{6,})-[0-9a-f]{8}$")
_TMP_PREFIX = ".tmp-"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True, slots=True)
class Snapshot:
    id: str  # the file stem; sorts by creation time
    path: Path
    size: int
    created: float  # epoch seconds (ring clock) when it was added
    sha256: str
    meta: Mapping[str, Any] = field(default_factory=dict)  # the caller's, e.g. epoch, attempt
    source: str | None = None  # the checkpoint it was copied from
    mtime: float = 0.0  # the source's mtime, also set on the copy
    validated_at: float = 0.0
    seq: int = 0
    # OK, or why the file no longer matches its record; None: not fully checked since it
    # last changed. An observation of the file, not part of the snapshot's identity.
    verdict: str | None = field(default=None, compare=False)

    @property
    def valid(self) -> bool | None:
        """True or False once checked, None when not known (see `verdict`)."""
        return None if self.verdict is None else self.verdict == OK

    def to_json(self) -> dict[str, Any]:
        """The form `gpuguardctl snapshots --json` shows; `problem` only on a broken one."""
        out: dict[str, Any] = {
            "id": self.id,
            "path": str(self.path),
            "size": self.size,
            "created": datetime.fromtimestamp(self.created, UTC).isoformat(timespec="seconds"),
            "sha256": self.sha256,
            "source": self.source,
            "meta": dict(self.meta),
            "valid": self.valid,
        }
        if self.valid is False:
            out["problem"] = self.verdict
        return out


class SnapshotCorrupt(ValueError):
    """A snapshot exists but is not the file that was recorded (truncated, changed, ...)."""

    def __init__(self, job: str, snapshot: Snapshot, reason: str) -> None:
        super().__init__(f"snapshot {snapshot.id} of job {job}: {reason}")
        self.job = job
        self.snapshot = snapshot
        self.reason = reason


# on_corrupt(snapshot, reason): told of each broken snapshot skipped on the way to a valid one
OnCorrupt = Callable[[Snapshot, str], None]


# for annotations inside SnapshotRing, whose `list` method shadows the builtin there
Snapshots = list[Snapshot]


@dataclass(frozen=True, slots=True)
class AddResult:
    """What add() did: `snapshot` is None when refused, `saved` False for a duplicate."""

    snapshot: Snapshot | None
    saved: bool
    reason: str


def check_job_name(job: str) -> str:
    """Refuse a name that could escape the ring's root (`..`, `/`, empty)."""
    if not valid_job_name(job):
        raise ValueError(f"invalid job name {job!r}: letters, digits, '_', '.', '-'; at most 64")
    return job


class SnapshotRing:
    """Validated copies of each job's checkpoint, with bounded retention."""

    def __init__(
        self,
        root: Path,
        *,
        keep_newest: int = 5,
        max_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if keep_newest < 1:
            raise ValueError("keep_newest must be at least 1")
        self.root = root
        self.keep_newest = keep_newest
        self.max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._checks = SnapshotChecks()
        root.mkdir(parents=True, exist_ok=True)
        self._clean_leftovers()

    # ---- adding -------------------------------------------------------------------

    def add(
        self,
        job: str,
        source: Path,
        *,
        job_workdir: Path | None = None,
        job_user: UserSpec | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> AddResult:
        """Copy `source` into the job's ring if it is a complete checkpoint.

        Never follows a symlink: the source and, with a workdir, every path
        component below the workdir are opened without following links, and a
        source outside the workdir is refused. With `job_user`, only a file
        that user could read is taken (`snapshot_files.open_source`).
        """
        jobdir = self._jobdir(job)
        meta = dict(meta or {})
        json.dumps(meta)  # a meta that cannot be stored is the caller's bug: fail before any I/O
        try:
            src_fd = open_source(source, job_workdir, job_user)
        except SourceRefused as exc:
            return self._refuse(job, source, str(exc))
        try:
            st = os.fstat(src_fd)
            if (refused := precheck(st)) is not None:
                return self._refuse(job, source, refused.reason)
            newest = self.newest(job)
            if newest is not None and (newest.source, newest.size, newest.mtime) == (str(source), st.st_size, st.st_mtime):
                # the file last taken, by its stat: read it to be sure before copying it again
                check = validate_fd(src_fd)
                if not check.ok:
                    return self._refuse(job, source, check.reason)
                if newest.sha256 == check.sha256 and self._verify(newest) == OK:
                    return AddResult(newest, False, f"unchanged: same content as snapshot {newest.id}")
            tmp = jobdir / f"{_TMP_PREFIX}{uuid.uuid4().hex}.pt"
            try:
                jobdir.mkdir(exist_ok=True)
                jobdir.chmod(0o711)  # whatever the daemon's umask: the job reaches its files, lists none
                copy = copy_validated(src_fd, tmp)
                if copy.ok:
                    _hand_to(tmp, job_user)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                reason = "disk full" if exc.errno in _DISK_FULL else f"copy failed: {exc.strerror or exc}"
                return self._refuse(job, source, reason)
        finally:
            os.close(src_fd)
        if not copy.ok:
            tmp.unlink(missing_ok=True)
            if copy.reason == CHANGED_WHILE_COPYING:
                return self._refuse(job, source, f"copy failed validation ({copy.reason}): source changed during copy")
            return self._refuse(job, source, copy.reason)  # the source itself is no complete checkpoint
        try:
            return self._commit(job, jobdir, tmp, copy, source, meta)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            reason = "disk full" if exc.errno in _DISK_FULL else f"commit failed: {exc.strerror or exc}"
            return self._refuse(job, source, reason)

    def _commit(
        self, job: str, jobdir: Path, tmp: Path, copy: CheckpointCheck, source: Path, meta: dict[str, Any]
    ) -> AddResult:
        """Sidecar first, then the snapshot: a crash between leaves only a sidecar orphan."""
        assert copy.sha256 is not None
        with self._lock:
            existing = self._list(job)
            # a concurrent add won; only its remembered verdict is asked, no file is read under the lock
            if existing and existing[0].sha256 == copy.sha256 and existing[0].verdict == OK:
                tmp.unlink()
                return AddResult(existing[0], False, f"unchanged: same content as snapshot {existing[0].id}")
            seq = existing[0].seq + 1 if existing else 1
            created = self._clock()
            stamp = datetime.fromtimestamp(created, UTC).strftime("%Y%m%dT%H%M%SZ")
            snap_id = f"{stamp}-{seq:06d}-{copy.sha256[:8]}"
            sidecar = {
                "source": str(source),
                "size": copy.size,
                "sha256": copy.sha256,
                "mtime": copy.mtime,
                "validated_at": time.time(),
                "created": created,
                "seq": seq,
                "meta": meta,
            }
            side_tmp = jobdir / f"{_TMP_PREFIX}{uuid.uuid4().hex}.json"
            try:
                write_synced(side_tmp, json.dumps(sidecar, indent=1).encode())
                os.replace(side_tmp, jobdir / f"{snap_id}.json")
            finally:
                side_tmp.unlink(missing_ok=True)
            os.replace(tmp, jobdir / f"{snap_id}.pt")
            fsync_dir(jobdir)
            snap = _from_sidecar(jobdir, snap_id, sidecar, OK)
            self._checks.trust(snap.path)
            self._retain(job, existing, snap)
        log.info("snapshot saved", job=job, snapshot=snap_id, size=copy.size, source=str(source))
        return AddResult(snap, True, "saved")

    def _retain(self, job: str, older: Snapshots, new: Snapshot) -> None:
        snaps = [new, *older]
        kept = select_retained(
            snaps, now=self._clock(), keep_newest=self.keep_newest, max_bytes=self.max_bytes, protect=new.id
        )
        keep_ids = {s.id for s in kept}
        for snap in snaps:
            if snap.id in keep_ids:
                continue
            try:
                _remove_snapshot(snap)
                self._checks.forget(snap.path)
            except OSError as exc:  # the new snapshot is in place; pruning retries after the next add
                log.warning("cannot prune snapshot", job=job, snapshot=snap.id, error=str(exc))
            else:
                log.info("snapshot pruned", job=job, snapshot=snap.id)
        fsync_dir(self._jobdir(job))

    def _refuse(self, job: str, source: Path, reason: str) -> AddResult:
        log.warning("checkpoint not snapshotted", job=job, source=str(source), reason=reason)
        return AddResult(None, False, reason)

    # ---- reading ------------------------------------------------------------------

    def list(self, job: str) -> Snapshots:
        """The job's snapshots, newest first, each marked valid, broken or unknown.

        Cheap enough for every status call: one stat per snapshot, no file
        read. A wrong size shows at once; a changed byte only after a hand-out
        (or the ring's own add) has read the file.
        """
        self._jobdir(job)
        return self._list(job)

    def newest(self, job: str) -> Snapshot | None:
        """The newest one as listed, unchecked: to show, never to resume from."""
        snaps = self.list(job)
        return snaps[0] if snaps else None

    def get(self, job: str, snapshot_id: str) -> Snapshot | None:
        """The snapshot of that id, verified; None when the job has none of that id.

        Raises SnapshotCorrupt when it exists but is not what was recorded:
        an operator who named it must hear why it cannot be used.
        """
        if not SNAPSHOT_ID.match(snapshot_id):
            return None
        snap = next((s for s in self.list(job) if s.id == snapshot_id), None)
        verdict = None if snap is None else self._verify(snap)
        if snap is None or verdict is None:
            return None
        if verdict != OK:
            raise SnapshotCorrupt(job, replace(snap, verdict=verdict), verdict)
        return replace(snap, verdict=OK)

    def before_newest(self, job: str, on_corrupt: OnCorrupt | None = None) -> Snapshot | None:
        """The default target of `rollback NAME`: one step back from where a restart would resume.

        That is the second newest among the snapshots that pass verification.
        Broken ones are skipped (and reported to `on_corrupt`), not raised:
        the newest valid one is what the job resumes from now, so one step
        back from it is what "roll back" means, and an operator asking without
        an id wants a usable snapshot, not an error to work around; the reply
        names the id chosen. None when fewer than two are valid.
        """
        valid = self._newest_verified(job, 2, on_corrupt)
        return valid[1] if len(valid) > 1 else None

    def newest_valid(self, job: str, on_corrupt: OnCorrupt | None = None) -> Snapshot | None:
        """What a job resumes from: the newest snapshot that passes verification.

        Each broken one skipped on the way is logged and passed to
        `on_corrupt(snapshot, reason)`, so the caller can record an event.
        """
        valid = self._newest_verified(job, 1, on_corrupt)
        return valid[0] if valid else None

    def remove_job(self, job: str) -> None:
        jobdir = self._jobdir(job)
        with self._lock:
            shutil.rmtree(jobdir, ignore_errors=True)
        self._checks.forget(jobdir)

    # ---- internals ----------------------------------------------------------------

    def _jobdir(self, job: str) -> Path:
        return self.root / check_job_name(job)

    def _newest_verified(self, job: str, count: int, on_corrupt: OnCorrupt | None) -> Snapshots:
        """Up to `count` valid snapshots, newest first; the broken ones newer than the last are reported."""
        found: Snapshots = []
        for snap in self.list(job):
            verdict = OK if self._checks.recently_ok(snap.path, snap.size) else self._verify(snap)
            if verdict == OK:
                found.append(replace(snap, verdict=OK))
                if len(found) == count:
                    break
            elif verdict is not None:
                log.warning("snapshot broken, skipped", job=job, snapshot=snap.id, reason=verdict)
                if on_corrupt is not None:
                    on_corrupt(replace(snap, verdict=verdict), verdict)
        return found

    def _verify(self, snap: Snapshot) -> str | None:
        """Read the file in full, outside the ring's lock: OK, why not, or None when gone (pruned meanwhile)."""
        try:
            return self._checks.verify(snap.path, size=snap.size, sha256=snap.sha256)
        except FileNotFoundError:
            return None

    def _list(self, job: str) -> Snapshots:
        jobdir = self._jobdir(job)
        snaps: Snapshots = []
        for sidecar in jobdir.glob("*.json"):
            snap_id = sidecar.stem
            if not SNAPSHOT_ID.match(snap_id):
                continue
            try:
                snap = _from_sidecar(jobdir, snap_id, json.loads(sidecar.read_bytes()))
                snaps.append(replace(snap, verdict=self._checks.cached(snap.path, snap.size)))
            except FileNotFoundError:
                continue  # a sidecar without its snapshot (or pruned meanwhile)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("unreadable snapshot sidecar, skipped", path=str(sidecar), error=str(exc))
        snaps.sort(key=lambda s: s.seq, reverse=True)
        return snaps

    def _clean_leftovers(self) -> None:
        """Remove temp files and sidecars without a snapshot, left by a crash."""
        for jobdir in self.root.iterdir():
            if not jobdir.is_dir() or jobdir.is_symlink() or not valid_job_name(jobdir.name):
                continue
            for entry in jobdir.iterdir():
                orphan = entry.suffix == ".json" and not entry.with_suffix(".pt").exists()
                if entry.name.startswith(_TMP_PREFIX) or orphan:
                    entry.unlink(missing_ok=True)
                    log.info("removed leftover from an interrupted snapshot", path=str(entry))


def _from_sidecar(jobdir: Path, snap_id: str, data: Mapping[str, Any], verdict: str | None = None) -> Snapshot:
    return Snapshot(
        id=snap_id,
        path=jobdir / f"{snap_id}.pt",
        size=int(data["size"]),
        created=float(data["created"]),
        sha256=str(data["sha256"]),
        meta=dict(data.get("meta") or {}),
        source=data.get("source"),
        mtime=float(data["mtime"]),
        validated_at=float(data.get("validated_at", 0.0)),
        seq=int(data["seq"]),
        verdict=verdict,
    )


def _remove_snapshot(snap: Snapshot) -> None:
    """The snapshot before its sidecar, so a crash between leaves only an orphan sidecar."""
    snap.path.unlink(missing_ok=True)
    snap.path.with_suffix(".json").unlink(missing_ok=True)


def _hand_to(path: Path, user: UserSpec | None) -> None:
    """The job must read the snapshot it resumes from (GPUGUARD_RESUME_FROM), whatever
    the daemon's umask (the unit's is 0027), and no other user may: 0600, owned by the
    job's user. Its sha256 is checked at every hand-out, so the job owning it changes nothing."""
    if user is not None and user.uid != 0 and os.geteuid() == 0:
        os.chown(path, user.uid, user.gid)
    os.chmod(path, 0o600)
