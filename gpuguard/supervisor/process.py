"""Start a managed job: its user, its log, and the exit-status wrapper it runs under.

Knows nothing of GPUs or job policy. A job runs under the `exitcode` wrapper
in its own session (so a SIGKILLed daemon does not take it along, and a new
daemon can still learn how it ended).

The wrapper keeps the daemon's ids (it must be able to write the status file
the job cannot forge), so nothing the caller sends may steer it: it starts
from a fixed environment, with Python's -I, in "/". The job's environment
travels in a memfd as plain data; the wrapper's child takes the job's ids
first, then enters the working directory and looks the command up on the
job's PATH, so loader and interpreter variables (LD_PRELOAD, PYTHONPATH, ...)
and paths only root may reach are only ever used with the job's own ids.
Whether the job got as far as exec comes back on a pipe: a missing command or
a workdir its user cannot enter fails here, in the caller, with the reason.

Given the job's name, spawn() also makes the job's own cgroup v2 (`cgroup`),
which the wrapper's child joins before exec, so every process the job forks
stays findable, across daemon restarts too; without a usable cgroup v2 the job
is tracked by its process tree alone.

A running job's tree and its stop sequence live in `jobprocess`, identity
checks in `pids`; the names the rest of the daemon uses are re-exported here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import select
import stat
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from gpuguard.supervisor import cgroup, exitcode
from gpuguard.supervisor.jobprocess import JobProcess, StopResult, adopt
from gpuguard.supervisor.pids import become_subreaper

__all__ = [
    "JobProcess",
    "StopResult",
    "UserSpec",
    "adopt",
    "become_subreaper",
    "default_status_path",
    "spawn",
]

# All the environment a wrapper (which keeps the daemon's ids) ever gets.
WRAPPER_ENV: Mapping[str, str] = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
# Appending, never through a symlink; a FIFO planted there fails (ENXIO)
# instead of blocking the daemon. The log is made blocking once it is checked.
_LOG_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
# How long spawn() waits to hear whether the job got as far as exec (the
# wrapper's interpreter start and a fork: tens of ms); after that the job counts
# as started, and a later failure shows as its exit status START_FAILED.
_START_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class UserSpec:
    """The ids a job runs with when the daemon is root."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    @classmethod
    def lookup(cls, name: str) -> UserSpec:
        """The user's ids and supplementary groups from the passwd/group databases (KeyError if unknown)."""
        entry = pwd.getpwnam(name)
        groups = tuple(g for g in os.getgrouplist(name, entry.pw_gid) if g != entry.pw_gid)
        return cls(entry.pw_uid, entry.pw_gid, groups)


def default_status_path(log_path: Path) -> Path:
    """Where the wrapper records the exit status unless spawn() is told otherwise."""
    return log_path.with_name(log_path.name + ".exit")


def _open_log(path: Path, user: UserSpec | None) -> int:
    """Open the job's log for appending: a regular file of the job's user, 0640, group the job's gid.

    The log an earlier attempt left is appended to. Anything else at the path
    (a symlink, a hard link, a FIFO, a file of another owner: planted, or a
    log of the job when it ran as someone else) is unlinked, never written
    through or handed to the job's user, and a new log takes its place.
    """
    owner = user if user is not None and os.geteuid() == 0 else None  # else the daemon's ids
    fd = _earlier_log(path, owner.uid if owner is not None else os.geteuid())
    if fd is None:
        try:
            fd = os.open(path, _LOG_FLAGS | os.O_CREAT | os.O_EXCL, 0o640)
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, "job log reappeared while it was replaced", str(path)) from None
    try:
        if owner is not None:
            os.fchown(fd, owner.uid, owner.gid)
        os.fchmod(fd, 0o640)  # whatever the daemon's umask
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _earlier_log(path: Path, owner: int) -> int | None:
    """The log of an earlier attempt, open; None once whatever else was at path is unlinked (or nothing was)."""
    try:
        fd = os.open(path, _LOG_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENXIO):  # a symlink; a FIFO nobody reads
            raise
        path.unlink()
        return None
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == owner:
        return fd
    os.close(fd)
    path.unlink()
    return None


def _env_memfd(env: Mapping[str, str]) -> int:
    """The job's environment as NUL-separated KEY=VALUE entries in a memfd, read from the start.

    A memfd, not a pipe: the daemon writes it whole without waiting for a reader.
    """
    entries = []
    for key, value in env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise ValueError(f"environment variable {key!r} cannot be passed to a process")
        entries.append(os.fsencode(f"{key}={value}"))
    fd = os.memfd_create("gpuguard-job-env")
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(b"\0".join(entries))
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _await_exec(report_fd: int, timeout_s: float) -> OSError | None:
    """The wrapper's reason why the job could not start; None once it exec'd (the pipe closed) or at the deadline."""
    deadline = time.monotonic() + timeout_s
    report = b""
    while (left := deadline - time.monotonic()) > 0 and select.select([report_fd], [], [], left)[0]:
        chunk = os.read(report_fd, 4096)
        if not chunk:
            break
        report += chunk
    if not report:
        return None
    return exitcode.parse_report(report)


def _reap(popen: subprocess.Popen[bytes]) -> None:
    """Collect a wrapper that reported a failed start (it exits right after recording it)."""
    try:
        popen.wait(_START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait()


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    user: UserSpec | None,
    log_path: Path,
    status_path: Path | None = None,
    job_name: str | None = None,
) -> JobProcess:
    """Start argv (no shell) under the exit-status wrapper, in a new session, detached from the daemon.

    env is the job's whole environment. The job's stdin is /dev/null and its
    output goes to log_path. With user, the job (not the wrapper) runs with
    those ids; that needs root unless user is the daemon's own uid. Raises
    OSError when the job cannot start (command not found or not executable,
    cwd not enterable, as the job's user) and ValueError for an unusable
    argv or env. With job_name the job runs in its own cgroup where one can
    be made (adopt() finds it again by the same name and status_path).
    """
    if not argv:
        raise ValueError("empty command")
    drop = user is not None and os.geteuid() == 0
    if user is not None and not drop and user.uid != os.geteuid():
        raise PermissionError(f"running a job as uid {user.uid} needs root")
    status_path = status_path or default_status_path(log_path)
    status_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-I", "-S", os.path.abspath(exitcode.__file__), str(status_path.absolute())]
    group = cgroup.create(job_name, status_path) if job_name is not None else None
    try:
        popen = _start(cmd, argv, env=env, cwd=cwd, user=user if drop else None, log_path=log_path, group=group)
    except BaseException:
        if group is not None:
            group.remove()
        raise
    # Our own unreaped child: its pid cannot have been reused yet.
    return JobProcess(popen.pid, psutil.Process(popen.pid).create_time(), status_path, popen=popen, cgroup=group)


def _start(
    cmd: list[str],
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    user: UserSpec | None,
    log_path: Path,
    group: cgroup.JobCgroup | None,
) -> subprocess.Popen[bytes]:
    """Run the wrapper (cmd, completed here) and wait to hear that the job exec'd; OSError with its reason if not.

    user: the ids the job's process takes (None: it keeps the wrapper's); group: the cgroup it joins.
    """
    with contextlib.ExitStack() as fds:
        report_r, report_w = os.pipe()
        fds.callback(os.close, report_r)
        with contextlib.ExitStack() as handed:  # our copies of what the wrapper inherits
            handed.callback(os.close, report_w)
            env_fd = _env_memfd(env)
            handed.callback(os.close, env_fd)
            cmd += [str(env_fd), str(report_w), str(cwd.absolute())]
            if user is not None:
                cmd += ["--user", str(user.uid), str(user.gid), ",".join(map(str, user.groups))]
            if group is not None:
                cmd += ["--cgroup", str(group.path)]
            cmd += ["--", *argv]
            log_fd = _open_log(log_path, user)
            handed.callback(os.close, log_fd)
            popen = subprocess.Popen(
                cmd,
                env=dict(WRAPPER_ENV),
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                close_fds=True,
                pass_fds=(env_fd, report_w),
                start_new_session=True,
            )
        failure = _await_exec(report_r, _START_TIMEOUT_S)
    if failure is not None:
        _reap(popen)
        raise failure
    return popen
