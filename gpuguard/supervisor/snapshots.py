"""A per-job ring of validated checkpoint copies, so a restart never gets a torn file.

The trainer's own `last.pt` may be mid-rewrite at any moment; the ring keeps
copies that passed validation twice (the source, then the copy, since the
source can change during the copy), renamed into place only when complete.
Layout: `root/<job>/<UTC time>-<seq>-<sha8>.pt` plus a `.json` sidecar with
the same stem. A crash leaves at most a `.tmp-*` file or a sidecar without
its snapshot; both are cleaned when the ring is opened.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from gpuguard.contract import valid_job_name
from gpuguard.supervisor.checkpoints import CHUNK, CheckpointCheck, validate, validate_fd

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

    def to_json(self) -> dict[str, Any]:
        """The form `gpuguardctl snapshots --json` shows."""
        return {
            "id": self.id,
            "path": str(self.path),
            "size": self.size,
            "created": datetime.fromtimestamp(self.created, UTC).isoformat(timespec="seconds"),
            "sha256": self.sha256,
            "source": self.source,
            "meta": dict(self.meta),
        }


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


def band(age_s: float) -> int:
    """Exponential age band: 0 under an hour, then k+1 for [2^k, 2^(k+1)) hours."""
    hours = age_s / 3600.0
    return 0 if hours < 1.0 else int(math.floor(math.log2(hours))) + 1


def select_retained(
    snapshots: Sequence[Snapshot], *, now: float, keep_newest: int, max_bytes: int, protect: str | None
) -> list[Snapshot]:
    """Which snapshots (newest first in, newest first out) survive retention.

    The newest `keep_newest`, then the oldest in each exponential age band
    (so a kept one ages into the next band instead of being replaced), then
    the oldest go until the total fits `max_bytes`. `protect` (the newest
    valid one) is never dropped.
    """
    kept = list(snapshots[:keep_newest])
    bands_taken: set[int] = set()
    for snap in reversed(snapshots[keep_newest:]):  # oldest first
        b = band(now - snap.created)
        if b not in bands_taken or snap.id == protect:
            bands_taken.add(b)
            kept.append(snap)
    kept.sort(key=lambda s: s.seq, reverse=True)
    total = sum(s.size for s in kept)
    for snap in reversed(list(kept)):
        if total <= max_bytes:
            break
        if snap.id != protect:
            kept.remove(snap)
            total -= snap.size
    return kept


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
        root.mkdir(parents=True, exist_ok=True)
        self._clean_leftovers()

    # ---- adding -------------------------------------------------------------------

    def add(
        self, job: str, source: Path, *, job_workdir: Path | None = None, meta: Mapping[str, Any] | None = None
    ) -> AddResult:
        """Copy `source` into the job's ring if it is a complete checkpoint.

        Never follows a symlink: the source and, with a workdir, every path
        component below the workdir are opened without following links, and a
        source outside the workdir is refused.
        """
        jobdir = self._jobdir(job)
        meta = dict(meta or {})
        json.dumps(meta)  # a meta that cannot be stored is the caller's bug: fail before any I/O
        try:
            src_fd = _open_source(source, job_workdir)
        except _Refused as exc:
            return self._refuse(job, source, str(exc))
        try:
            check = validate_fd(src_fd)
            if not check.ok:
                return self._refuse(job, source, check.reason)
            newest = self.newest(job)
            if newest is not None and newest.sha256 == check.sha256 and _still_valid(newest):
                return AddResult(newest, False, f"unchanged: same content as snapshot {newest.id}")
            tmp = jobdir / f"{_TMP_PREFIX}{uuid.uuid4().hex}.pt"
            try:
                jobdir.mkdir(exist_ok=True)
                copy = self._copy(src_fd, tmp)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                reason = "disk full" if exc.errno in _DISK_FULL else f"copy failed: {exc.strerror or exc}"
                return self._refuse(job, source, reason)
        finally:
            os.close(src_fd)
        if not copy.ok:
            tmp.unlink(missing_ok=True)
            return self._refuse(job, source, f"copy failed validation ({copy.reason}): source changed during copy")
        try:
            return self._commit(job, jobdir, tmp, copy, source, meta)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            reason = "disk full" if exc.errno in _DISK_FULL else f"commit failed: {exc.strerror or exc}"
            return self._refuse(job, source, reason)

    def _copy(self, src_fd: int, tmp: Path) -> CheckpointCheck:
        """Copy to `tmp` (the source's mode, owner and mtime), fsync, validate the copy.

        The owner is kept so a job running as its own user can read the
        snapshot it is resumed from.
        """
        src = os.fstat(src_fd)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, src.st_mode & 0o777)
        try:
            if os.geteuid() == 0:
                os.fchown(fd, src.st_uid, src.st_gid)
            _copy_fd(src_fd, fd)
            os.fsync(fd)
            os.utime(fd, ns=(src.st_atime_ns, src.st_mtime_ns))
        finally:
            os.close(fd)
        return validate(tmp)

    def _commit(
        self, job: str, jobdir: Path, tmp: Path, copy: CheckpointCheck, source: Path, meta: dict[str, Any]
    ) -> AddResult:
        """Sidecar first, then the snapshot: a crash between leaves only a sidecar orphan."""
        assert copy.sha256 is not None
        with self._lock:
            existing = self._list(job)
            if existing and existing[0].sha256 == copy.sha256 and _still_valid(existing[0]):  # a concurrent add won
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
                _write_synced(side_tmp, json.dumps(sidecar, indent=1).encode())
                os.replace(side_tmp, jobdir / f"{snap_id}.json")
            finally:
                side_tmp.unlink(missing_ok=True)
            os.replace(tmp, jobdir / f"{snap_id}.pt")
            _fsync_dir(jobdir)
            snap = _from_sidecar(jobdir, snap_id, sidecar)
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
            except OSError as exc:  # the new snapshot is in place; pruning retries after the next add
                log.warning("cannot prune snapshot", job=job, snapshot=snap.id, error=str(exc))
            else:
                log.info("snapshot pruned", job=job, snapshot=snap.id)
        _fsync_dir(self._jobdir(job))

    def _refuse(self, job: str, source: Path, reason: str) -> AddResult:
        log.warning("checkpoint not snapshotted", job=job, source=str(source), reason=reason)
        return AddResult(None, False, reason)

    # ---- reading ------------------------------------------------------------------

    def list(self, job: str) -> Snapshots:
        """The job's snapshots, newest first."""
        self._jobdir(job)
        return self._list(job)

    def newest(self, job: str) -> Snapshot | None:
        snaps = self.list(job)
        return snaps[0] if snaps else None

    def before_newest(self, job: str) -> Snapshot | None:
        """The default target of a rollback: the one before the newest."""
        snaps = self.list(job)
        return snaps[1] if len(snaps) > 1 else None

    def get(self, job: str, snapshot_id: str) -> Snapshot | None:
        if not SNAPSHOT_ID.match(snapshot_id):
            return None
        return next((s for s in self.list(job) if s.id == snapshot_id), None)

    def newest_valid(self, job: str) -> Snapshot | None:
        """The newest snapshot that still holds what was validated, skipping broken ones.

        Unchanged size and mtime are trusted; otherwise the file is fully
        checked and must still have the recorded sha256.
        """
        for snap in self.list(job):
            if _still_valid(snap):
                return snap
            log.warning("snapshot no longer valid, skipped", job=job, snapshot=snap.id)
        return None

    def remove_job(self, job: str) -> None:
        jobdir = self._jobdir(job)
        with self._lock:
            shutil.rmtree(jobdir, ignore_errors=True)

    # ---- internals ----------------------------------------------------------------

    def _jobdir(self, job: str) -> Path:
        return self.root / check_job_name(job)

    def _list(self, job: str) -> Snapshots:
        jobdir = self._jobdir(job)
        snaps: Snapshots = []
        for sidecar in jobdir.glob("*.json"):
            snap_id = sidecar.stem
            if not SNAPSHOT_ID.match(snap_id) or not (jobdir / f"{snap_id}.pt").is_file():
                continue
            try:
                snaps.append(_from_sidecar(jobdir, snap_id, json.loads(sidecar.read_bytes())))
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


class _Refused(Exception):
    """Internal: the source may not be opened (symlink, outside the workdir, ...)."""


def _open_source(source: Path, workdir: Path | None) -> int:
    """Open the source read-only without following any symlink (below the workdir)."""
    source = Path(os.path.abspath(source))
    if source.is_symlink():
        raise _Refused("source is a symlink")
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        if workdir is None:
            return os.open(source, flags)
        rel = _relative_to_workdir(source, workdir)
        dir_fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in rel.parts[:-1]:
                next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                os.close(dir_fd)
                dir_fd = next_fd
            return os.open(rel.parts[-1], flags, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
    except FileNotFoundError:
        raise _Refused("no such file") from None
    except PermissionError:
        raise _Refused("permission denied") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _Refused("a symlink in the source path") from None
        raise _Refused(f"cannot open: {exc.strerror or exc}") from None


def _relative_to_workdir(source: Path, workdir: Path) -> Path:
    """The source's path below the workdir (as given or as resolved), else refuse."""
    for base in (Path(os.path.abspath(workdir)), workdir.resolve()):
        if source.is_relative_to(base) and source != base:
            return source.relative_to(base)
    raise _Refused(f"source is outside the job's workdir {workdir}")


def _copy_fd(src_fd: int, dst_fd: int) -> None:
    """Stream the whole source into the destination in bounded chunks."""
    offset = 0
    while chunk := os.pread(src_fd, CHUNK, offset):
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst_fd, view) :]
        offset += len(chunk)


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make renames and unlinks in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _from_sidecar(jobdir: Path, snap_id: str, data: Mapping[str, Any]) -> Snapshot:
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
    )


def _remove_snapshot(snap: Snapshot) -> None:
    """The snapshot before its sidecar, so a crash between leaves only an orphan sidecar."""
    snap.path.unlink(missing_ok=True)
    snap.path.with_suffix(".json").unlink(missing_ok=True)


def _still_valid(snap: Snapshot) -> bool:
    try:
        st = os.stat(snap.path)
    except OSError:
        return False
    if st.st_size == snap.size and st.st_mtime == snap.mtime:
        return True
    check = validate(snap.path)
    return check.ok and check.sha256 == snap.sha256
