"""The wrapper every managed job runs under, so a restarted daemon can learn how it ended.

`python -I -S exitcode.py STATUS_FILE [--user UID GID GROUPS] -- ARGV...` runs
ARGV as its child, forwards every catchable signal to it, and when it ends
writes its exit status (the code, or -N for death by signal N, as subprocess
reports it) to STATUS_FILE atomically, then exits the same way (re-raising the
signal). A daemon that adopts the job after its own restart is not the job's
parent and cannot waitpid() it; the file is the only place the status
survives. The wrapper drops to the job's user itself (it stays with the
daemon's ids so it can always write STATUS_FILE; the job cannot forge it).

Stdlib only and run by path with -I -S: the job's PYTHONPATH, cwd or user
must not change how the wrapper itself starts.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

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


def write_status(path: Path, returncode: int) -> None:
    """Write the status via a temp file and rename, so a reader sees all of it or nothing."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{returncode}\n")
    os.replace(tmp, path)


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


def _parse(args: list[str]) -> tuple[Path, tuple[int, int, list[int]] | None, list[str]]:
    if "--" not in args or args.index("--") < 1:
        raise SystemExit("usage: exitcode.py STATUS_FILE [--user UID GID GROUPS] -- ARGV...")
    sep = args.index("--")
    head, argv = args[:sep], args[sep + 1 :]
    if not argv:
        raise SystemExit("exitcode.py: no command after --")
    user = None
    if len(head) == 5 and head[1] == "--user":
        groups = [int(g) for g in head[4].split(",") if g]
        user = (int(head[2]), int(head[3]), groups)
    elif len(head) != 1:
        raise SystemExit("exitcode.py: expected STATUS_FILE [--user UID GID GROUPS]")
    return Path(head[0]), user, argv


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
    status_path, user, argv = _parse(args)
    forward = _Forwarder()
    for sig in FORWARDED:
        signal.signal(sig, forward)
    opts: dict[str, object] = {"env": {**os.environ, MARKER: str(os.getpid())}}
    if user is not None:
        uid, gid, groups = user
        opts |= {"user": uid, "group": gid, "extra_groups": groups, "umask": 0o022}
    try:
        child = subprocess.Popen(argv, **opts)  # type: ignore[call-overload]
    except OSError as exc:
        print(f"gpuguard: cannot start {argv[0]!r}: {exc}", file=sys.stderr, flush=True)
        write_status(status_path, 127)
        sys.exit(127)
    forward.started(child)
    returncode = child.wait()
    write_status(status_path, returncode)
    _exit_like(returncode)


if __name__ == "__main__":
    main(sys.argv[1:])
