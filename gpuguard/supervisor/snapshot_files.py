"""The snapshot ring's file operations: reading a job's checkpoint, writing durably.

The checkpoint path and every directory below the job's workdir are the
job's to control: a symlink there could make the root daemon copy another
user's file into a snapshot the job may read, so nothing there is followed.
A job that runs as a user gets only what that user could read: each
directory from `/` to the file must be searchable by the user and the file
readable by it, judged from the mode bits as the kernel would (ACLs are not
read), on the very descriptors that are opened, so nothing can be swapped
between the check and the copy. Files the daemon reads for a job
(`read_small`) are opened without following a symlink or blocking on a FIFO.
Writes into the ring are fsynced before they are renamed into place.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

from gpuguard.durable import write_all
from gpuguard.supervisor.checkpoints import CHUNK, CheckpointCheck, complete_problem, ends_problem, precheck
from gpuguard.supervisor.process import UserSpec

_READ, _SEARCH = 4, 1  # the r and x bits of each class (owner, group, others)
_NO_FOLLOW = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
CHANGED_WHILE_COPYING = "changed while copying"


class SourceRefused(Exception):
    """The source may not be opened (symlink, outside the workdir, ...); the message says why."""


def open_source(source: Path, workdir: Path | None, user: UserSpec | None = None) -> int:
    """Open the source read-only, following no symlink below the workdir, as `user` could.

    `user` None (or root) may read anything; the workdir's own path may go
    through symlinks (it is resolved first), nothing below it may.
    """
    source = Path(os.path.abspath(source))
    if source.is_symlink():
        raise SourceRefused("source is a symlink")
    if workdir is None:
        base, rel = Path(os.path.realpath(source.parent)), Path(source.name)
    else:
        base, rel = Path(os.path.realpath(workdir)), _relative_to_workdir(source, workdir)
    checked = None if user is None or user.uid == 0 else user
    try:
        dir_fd = os.open("/", _DIR)
        try:
            where = Path("/")
            for part in (*base.parts[1:], *rel.parts[:-1]):
                _require(dir_fd, checked, _SEARCH, f"cannot search {where}")
                next_fd = os.open(part, _DIR, dir_fd=dir_fd)
                os.close(dir_fd)
                dir_fd, where = next_fd, where / part
            _require(dir_fd, checked, _SEARCH, f"cannot search {where}")
            fd = os.open(rel.parts[-1], _NO_FOLLOW, dir_fd=dir_fd)
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
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SourceRefused("not a regular file")
        _require(fd, checked, _READ, "may not read it")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _require(fd: int, user: UserSpec | None, want: int, what: str) -> None:
    """Refuse unless `user` (None: anyone) has `want` on the open file, by its mode bits."""
    if user is None:
        return
    st = os.fstat(fd)
    if st.st_uid == user.uid:
        shift = 6
    elif st.st_gid == user.gid or st.st_gid in user.groups:
        shift = 3
    else:
        shift = 0
    if not (st.st_mode >> shift) & want:
        mode = stat.S_IMODE(st.st_mode)
        raise SourceRefused(f"the job's user (uid {user.uid}) {what} (owner uid {st.st_uid}, gid {st.st_gid}, mode {mode:04o})")


def read_small(path: Path, owner: int | None, limit: int) -> bytes:
    """The content of a small regular file a job controls: no symlink followed, no
    wait on a FIFO, owned by `owner` (None: anyone), at most `limit` bytes.

    Raises FileNotFoundError when it is absent, SourceRefused otherwise.
    """
    try:
        fd = os.open(path, _NO_FOLLOW)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise
        raise SourceRefused("a symlink" if exc.errno == errno.ELOOP else f"cannot open: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SourceRefused("not a regular file")
        if owner is not None and st.st_uid != owner:
            raise SourceRefused(f"owned by uid {st.st_uid}, not the job's uid {owner}")
        data = b""
        while len(data) <= limit and (chunk := os.read(fd, limit + 1 - len(data))):
            data += chunk
    finally:
        os.close(fd)
    if len(data) > limit:
        raise SourceRefused(f"larger than {limit} bytes")
    return data


def _relative_to_workdir(source: Path, workdir: Path) -> Path:
    """The source's path below the workdir (as given or as resolved), else refuse."""
    for base in (Path(os.path.abspath(workdir)), workdir.resolve()):
        if source.is_relative_to(base) and source != base:
            return source.relative_to(base)
    raise SourceRefused(f"source is outside the job's workdir {workdir}")


def copy_validated(src_fd: int, tmp: Path) -> CheckpointCheck:
    """Copy to `tmp` (the source's mode, owner and mtime), hashing what is written; check the copy
    is a complete checkpoint; fsync. Not ok when the source changed while it was copied.

    One read of the source and one of the copy (from the page cache): a resumed attempt waits for
    this copy. The owner is kept so a job running as its own user can read the snapshot it is
    resumed from.
    """
    src = os.fstat(src_fd)
    if (refused := precheck(src)) is not None:
        return refused
    if (problem := ends_problem(src_fd)) is not None:  # no copy of what cannot be a checkpoint
        return CheckpointCheck(False, problem, src.st_size, src.st_mtime, None)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, src.st_mode & 0o777)
    try:
        if os.geteuid() == 0:
            os.fchown(fd, src.st_uid, src.st_gid)
        digest, copied = copy_fd(src_fd, fd)
        after = os.fstat(src_fd)
        if (copied, after.st_size, after.st_mtime_ns) != (src.st_size, src.st_size, src.st_mtime_ns):
            return CheckpointCheck(False, CHANGED_WHILE_COPYING, copied, src.st_mtime, None)
        if (problem := complete_problem(fd, copied)) is not None:
            return CheckpointCheck(False, problem, copied, src.st_mtime, None)
        os.fsync(fd)
        os.utime(fd, ns=(src.st_atime_ns, src.st_mtime_ns))
    finally:
        os.close(fd)
    return CheckpointCheck(True, "ok", copied, src.st_mtime, digest)


def copy_fd(src_fd: int, dst_fd: int) -> tuple[str, int]:
    """Stream the whole source into the destination in bounded chunks; its sha256 and size."""
    digest, offset = hashlib.sha256(), 0
    while chunk := os.pread(src_fd, CHUNK, offset):
        write_all(dst_fd, chunk)
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest(), offset
