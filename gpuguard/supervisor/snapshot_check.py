"""Is a snapshot still the file that was recorded? Asked whenever one is handed out.

A snapshot can break after it was taken (a bad disk, a torn file left by a
crash and a filesystem repair, a stray `truncate`), and a job resumed from it
would crash again or train on damaged weights. A hand-out therefore reads the
whole file (size, sha256, zip structure: about what the job's own load costs).
`list` runs on every status call, so it only stats: it shows the verdict of
the last full check while the file's inode, size, mtime and ctime are
unchanged (ctime cannot be set back from user space, so `touch -r` does not
hide a change from it).

One exception keeps a restart off the disk: a snapshot written or fully
read less than RECENT_S ago and unchanged since is handed out on that
verdict. Its pages are still in the page cache, so a second read would
check memory, not the disk; a change by anyone shows in the fingerprint.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path
from time import monotonic

from gpuguard.supervisor.checkpoints import size_problem, verify_fd

OK = "ok"
RECENT_S = 60.0  # a full check this fresh, of an unchanged file, stands at a hand-out
_Fingerprint = tuple[int, int, int, int, int]
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC


class SnapshotChecks:
    """Full checks of snapshot files, and their verdicts remembered per fingerprint.

    Thread-safe; the lock guards only the memory, never a read of a file, so a
    long check holds up nobody.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._verdicts: dict[Path, tuple[_Fingerprint, str, float]] = {}  # + when (monotonic) it was found

    def verify(self, path: Path, *, size: int, sha256: str) -> str:
        """Read the whole file: OK, or why it is not the recorded snapshot.

        Neither the file nor its job directory is followed if it is a symlink.
        Raises FileNotFoundError when it is gone (e.g. pruned meanwhile).
        """
        if problem := _kind_problem(os.lstat(path)):
            return problem
        fd = _open_nofollow(path)
        if isinstance(fd, str):
            return fd
        try:
            st = os.fstat(fd)  # the fingerprint of what is read, not of what the path named before
            verdict = verify_fd(fd, size=size, sha256=sha256) or OK
        finally:
            os.close(fd)
        self._remember(path, st, verdict)
        return verdict

    def cached(self, path: Path, size: int) -> str | None:
        """Without reading the file: OK or why not when known; None when it was
        not fully checked since it last changed. Raises FileNotFoundError."""
        st = os.lstat(path)
        if problem := _kind_problem(st) or size_problem(st.st_size, size):
            return problem
        with self._lock:
            seen = self._verdicts.get(path)
        return seen[1] if seen is not None and seen[0] == _fingerprint(st) else None

    def recently_ok(self, path: Path, size: int) -> bool:
        """Found OK by a full check (or written by the ring) less than RECENT_S ago, unchanged since."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if _kind_problem(st) or size_problem(st.st_size, size):
            return False
        with self._lock:
            seen = self._verdicts.get(path)
        return seen is not None and seen[:2] == (_fingerprint(st), OK) and monotonic() - seen[2] < RECENT_S

    def trust(self, path: Path) -> None:
        """Record as OK a file its writer has just validated (a new snapshot)."""
        self._remember(path, os.lstat(path), OK)

    def forget(self, path: Path) -> None:
        """Drop what is known about `path`, or about every file in it when it is a directory."""
        with self._lock:
            for known in [p for p in self._verdicts if path in (p, p.parent)]:
                del self._verdicts[known]

    def _remember(self, path: Path, st: os.stat_result, verdict: str) -> None:
        with self._lock:
            self._verdicts[path] = (_fingerprint(st), verdict, monotonic())


def _open_nofollow(path: Path) -> int | str:
    """The open file, or why it cannot be opened; FileNotFoundError when it is gone."""
    try:
        dir_fd = os.open(path.parent, _DIR_FLAGS)
        try:
            return os.open(path.name, _FILE_FLAGS, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return "a symlink in the snapshot's path"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return "permission denied"
        return f"cannot open: {exc.strerror or exc}"


def _kind_problem(st: os.stat_result) -> str | None:
    if stat.S_ISLNK(st.st_mode):
        return "a symlink, not a snapshot file"
    return None if stat.S_ISREG(st.st_mode) else "not a regular file"


def _fingerprint(st: os.stat_result) -> _Fingerprint:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
