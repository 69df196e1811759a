"""The wrapper every managed job runs under, so a restarted daemon can learn how it ended.

`python -I -S exitcode.py STATUS_FILE ENV_FD REPORT_FD WORKDIR [--user UID GID GROUPS] [--cgroup DIR] -- ARGV...`
runs ARGV as its child, forwards every catchable signal to it, and when it
ends writes its exit status (the code, or -N for death by signal N, as
subprocess reports it) to STATUS_FILE atomically, then exits the same way
(re-raising the signal). A daemon that adopts the job after its own restart
is not the job's parent and cannot waitpid() it; the file is the only place
the status survives. The wrapper keeps the daemon's ids so it can always write
STATUS_FILE (the job cannot forge it); only its child takes the job's ids.

So nothing the job's caller chose may steer the wrapper: it is started from a
fixed environment, in "/", by path with -I -S, and reads the job's
environment from ENV_FD as data for the child's execve. The child enters
WORKDIR and the command is looked up on the job's PATH only after the child
has taken the job's ids. Before it takes them, the child joins the job's
cgroup DIR (so every process the job forks is born there; the wrapper stays
outside, so a kill of that cgroup cannot end the wrapper before it writes
STATUS_FILE) and gives up the daemon's OOM score (the unit's -500 keeps the
daemon alive; a job must not share that). A job that cannot start that way (STATUS
START_FAILED) has its reason written to REPORT_FD, which spawn() reads, and to
the log; REPORT_FD closes without a word once the job has exec'd.

Stdlib only, and light to import: spawn() waits for this start.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType
from typing import NamedTuple, NoReturn

# Signals that the wrapper hands on instead of dying from. Faults of the
# wrapper itself (SEGV, BUS, ...), job control stops and SIGCHLD are not
# forwarded; SIGKILL and SIGSTOP cannot be.
_NOT_FORWARDED = {
    signal.SIGKILL,
    signal.SIGSTOP,
    signal.SIGCHLD,
    signal.SIGTSTP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGSEGV,
    signal.SIGBUS,
    signal.SIGFPE,
    signal.SIGILL,
    signal.SIGABRT,
    signal.SIGTRAP,
    signal.SIGSYS,
}
FORWARDED: frozenset[int] = frozenset(int(s) for s in signal.valid_signals() if s not in _NOT_FORWARDED)

# Set in the job's environment to the wrapper's pid: a process orphaned into a
# new session, never seen by the daemon, can still be traced back to its job.
MARKER = "GPUGUARD_WRAPPER_PID"

START_FAILED = 127  # the status of a job that never got as far as exec, as a shell has it
# Every job's OOM score: the kernel's ordinary one, whatever the daemon's own.
JOB_OOM_SCORE_ADJ = 0
_USAGE = "usage: exitcode.py STATUS_FILE ENV_FD REPORT_FD WORKDIR [--user UID GID GROUPS] [--cgroup DIR] -- ARGV..."


def write_status(path: Path, returncode: int) -> None:
    """Write the status via a new temp file and rename, so a reader sees all of it or nothing.

    The temp file is created, never opened through whatever sits at its name.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # left by a wrapper that had this pid before
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with open(fd, "w") as f:
        f.write(f"{returncode}\n")
    os.replace(tmp, path)


def format_report(errno: int, reason: str) -> bytes:
    """A failed start as REPORT_FD carries it: the errno, a space, the reason."""
    return f"{errno} {reason}".encode("utf-8", "backslashreplace")


def parse_report(report: bytes) -> OSError:
    """The error a wrapper reported; OSError picks the subclass by errno (FileNotFoundError, ...)."""
    errno, _, reason = report.decode("utf-8", "replace").partition(" ")
    return OSError(int(errno), reason)


def read_status(path: Path) -> int | None:
    """The status a wrapper wrote, or None when there is none (it was SIGKILLed, or still runs)."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


class _Forwarder:
    """Signal handler that passes signals to the child, queueing those that come before it exists."""

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.pending: list[int] = []

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        if self.child is None:
            self.pending.append(signum)
            return
        try:
            self.child.send_signal(signum)
        except ProcessLookupError:
            pass

    def started(self, child: subprocess.Popen[bytes]) -> None:
        self.child = child
        while self.pending:
            self(self.pending.pop(0), None)


class _Args(NamedTuple):
    """The command line (no dataclasses: the wrapper must start fast)."""

    status_path: Path
    env_fd: int
    report_fd: int
    workdir: str
    user: tuple[int, int, list[int]] | None
    cgroup: str | None
    argv: list[str]


def _parse(args: list[str]) -> _Args:
    if "--" not in args:
        raise SystemExit(_USAGE)
    sep = args.index("--")
    head, argv = args[:sep], args[sep + 1 :]
    if not argv:
        raise SystemExit("exitcode.py: no command after --")
    if len(head) < 4:
        raise SystemExit(_USAGE)
    options = head[4:]
    user = cgroup = None
    while options:
        if options[0] == "--user" and user is None and len(options) >= 4:
            user = (int(options[1]), int(options[2]), [int(g) for g in options[3].split(",") if g])
            options = options[4:]
        elif options[0] == "--cgroup" and cgroup is None and len(options) >= 2:
            cgroup, options = options[1], options[2:]
        else:
            raise SystemExit(_USAGE)
    return _Args(Path(head[0]), int(head[1]), int(head[2]), head[3], user, cgroup, argv)


def _read_env(fd: int) -> dict[str, str]:
    """The job's environment (NUL-separated KEY=VALUE): data for the child's execve, never this process's own."""
    with open(fd, "rb") as f:
        data = f.read()
    env = {}
    for entry in data.split(b"\0"):
        if entry:
            key, _, value = entry.partition(b"=")
            env[os.fsdecode(key)] = os.fsdecode(value)
    return env


def _report(fd: int, errno: int, reason: str) -> None:
    """Tell the job's log and the waiting spawn() why the job could not start."""
    os.write(2, f"gpuguard: cannot start: {reason}\n".encode("utf-8", "backslashreplace"))
    try:
        os.write(fd, format_report(errno, reason))
    except OSError:  # spawn() stopped waiting: the status file and the log still tell
        pass


def _child_failed(report_fd: int, exc: OSError, what: str) -> NoReturn:
    """In the child before exec: the job never starts; spawn() and the log learn why."""
    _report(report_fd, exc.errno or 0, f"{what}: {exc.strerror}")
    os._exit(START_FAILED)


def _join(cgroup: str) -> None:
    """Move this process (the job-to-be) into the job's cgroup. A refusal does not stop the
    job: it is then tracked by its process tree alone, and its log says so."""
    try:
        fd = os.open(os.path.join(cgroup, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
    except OSError as exc:
        os.write(2, f"gpuguard: cannot join cgroup {cgroup}: {exc.strerror}; tracking the job by its process tree\n".encode())


def _become_job(user: tuple[int, int, list[int]] | None, workdir: str, report_fd: int, cgroup: str | None) -> None:
    """Run in the child before exec: the job's cgroup and OOM score, then the job's ids, then its workdir.

    The cgroup and the score come first: once the ids are dropped the child
    can write neither cgroup.procs nor its /proc files until it execs. Written
    with CAP_SYS_RESOURCE the score also becomes the floor the job cannot lower
    its score below. The workdir is entered as the job's user.
    """
    if cgroup is not None:
        _join(cgroup)
    try:
        fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, str(JOB_OOM_SCORE_ADJ).encode())
        finally:
            os.close(fd)
    except OSError as exc:
        _child_failed(report_fd, exc, f"OOM score {JOB_OOM_SCORE_ADJ}")
    if user is not None:
        uid, gid, groups = user
        try:
            os.setgroups(groups)
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        except OSError as exc:
            _child_failed(report_fd, exc, f"switching to uid {uid} gid {gid}")
    try:
        os.chdir(workdir)
    except OSError as exc:
        _child_failed(report_fd, exc, f"working directory {workdir!r} as uid {os.getuid()}")


def _exit_like(returncode: int) -> None:
    """Exit with the child's code, or die of the child's signal (without a second core dump)."""
    if returncode >= 0:
        sys.exit(returncode)
    sig = -returncode
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sig in FORWARDED:  # the others still have their default action here
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    sys.exit(128 + sig)  # a signal whose default is to be ignored


def main(args: list[str]) -> None:
    a = _parse(args)
    env = {**_read_env(a.env_fd), MARKER: str(os.getpid())}
    os.set_inheritable(a.report_fd, False)  # the job's exec closes it: that is how spawn() learns it started
    forward = _Forwarder()
    for sig in FORWARDED:
        signal.signal(sig, forward)
    umask = -1 if a.user is None else 0o022
    try:
        child = subprocess.Popen(
            a.argv, env=env, umask=umask, preexec_fn=lambda: _become_job(a.user, a.workdir, a.report_fd, a.cgroup)
        )
    except OSError as exc:  # exec failed in the child, as the job's user
        _report(a.report_fd, exc.errno or 0, f"command {a.argv[0]!r}: {exc.strerror}")
        write_status(a.status_path, START_FAILED)
        sys.exit(START_FAILED)
    os.close(a.report_fd)
    forward.started(child)
    returncode = child.wait()
    write_status(a.status_path, returncode)
    _exit_like(returncode)


if __name__ == "__main__":
    main(sys.argv[1:])
