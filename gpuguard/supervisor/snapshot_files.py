"""The snapshot ring's file operations: reading a job's checkpoint, writing durably.

The checkpoint path and every directory below the job's workdir are the
job's to control: a symlink there could make the root daemon copy another
user's file into a snapshot the job may read, so nothing there is followed.
Writes into the ring are fsynced before they are renamed into place.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from gpuguard.supervisor.checkpoints import CHUNK, CheckpointCheck, validate


class SourceRefused(Exception):
    """The source may not be opened (symlink, outside the workdir, ...); the message says why."""


def open_source(source: Path, workdir: Path | None) -> int:
    """Open the source read-only without following any symlink (below the workdir)."""
    source = Path(os.path.abspath(source))
    if source.is_symlink():
        raise SourceRefused("source is a symlink")
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
        raise SourceRefused("no such file") from None
    except PermissionError:
        raise SourceRefused("permission denied") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise SourceRefused("a symlink in the source path") from None
        raise SourceRefused(f"cannot open: {exc.strerror or exc}") from None


def _relative_to_workdir(source: Path, workdir: Path) -> Path:
    """The source's path below the workdir (as given or as resolved), else refuse."""
    for base in (Path(os.path.abspath(workdir)), workdir.resolve()):
        if source.is_relative_to(base) and source != base:
            return source.relative_to(base)
    raise SourceRefused(f"source is outside the job's workdir {workdir}")


def copy_validated(src_fd: int, tmp: Path) -> CheckpointCheck:
    """Copy to `tmp` (the source's mode, owner and mtime), fsync, validate the copy.

    The owner is kept so a job running as its own user can read the
    snapshot it is resumed from.
    """
    src = os.fstat(src_fd)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, src.st_mode & 0o777)
    try:
        if os.geteuid() == 0:
            os.fchown(fd, src.st_uid, src.st_gid)
        copy_fd(src_fd, fd)
        os.fsync(fd)
        os.utime(fd, ns=(src.st_atime_ns, src.st_mtime_ns))
    finally:
        os.close(fd)
    return validate(tmp)


def copy_fd(src_fd: int, dst_fd: int) -> None:
    """Stream the whole source into the destination in bounded chunks."""
    offset = 0
    while chunk := os.pread(src_fd, CHUNK, offset):
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst_fd, view) :]
        offset += len(chunk)


def write_synced(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist) with `data`, on disk before this returns."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make renames and unlinks in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
