"""Pids that cannot be mistaken: identity checks, safe signalling and the /proc scan.

A pid alone can name a different process once the first one is reaped, so a
process is known by (pid, create_time) and checked before every signal; where
the kernel has pidfds the check is made after opening one, so it cannot race.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
import signal
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from gpuguard.supervisor import exitcode

PR_SET_CHILD_SUBREAPER = 36
SAME_TIME_S = 0.005  # create times this close name the same process


def become_subreaper() -> bool:
    """Make orphans of our jobs' trees re-parent to this process, where `tree()` still finds them."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


@functools.cache
def pidfd_supported() -> bool:
    """True on kernels with pidfd_open and pidfd_send_signal (5.3+)."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return hasattr(signal, "pidfd_send_signal")


def create_time(pid: int) -> float | None:
    """When pid was created (psutil's clock), None when there is no such process."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def same_process(pid: int, created: float) -> bool:
    """True when pid is still the process that was created at `created`."""
    found = create_time(pid)
    return found is not None and abs(found - created) < SAME_TIME_S


def signal_verified(pid: int, created: float, sig: int) -> bool:
    """Signal pid only if it is still the same process; by pidfd so the check cannot race."""
    return signal_checked(pid, sig, lambda: same_process(pid, created))


def signal_checked(pid: int, sig: int, check: Callable[[], bool]) -> bool:
    """Signal pid only if check() holds for it; where pidfds exist, check() runs after one is
    open, so it is about the very process that gets the signal."""
    if not pidfd_supported():
        if not check():
            return False
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        return True
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        if not check():  # checked after opening: the fd pins this very process
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The parts of /proc/PID/stat that place a process in a tree."""

    ppid: int
    sid: int
    zombie: bool


def scan() -> dict[int, ProcStat]:
    """ppid, session and zombie state of every process, from one pass over /proc."""
    table: dict[int, ProcStat] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rfind(b")") + 2 :].split()  # after "pid (comm) "
        table[int(name)] = ProcStat(ppid=int(fields[1]), sid=int(fields[3]), zombie=fields[0] in (b"Z", b"X"))
    return table


def marked(pid: int) -> int | None:
    """The wrapper pid recorded in a process's environment (`exitcode.MARKER`), if any."""
    prefix = exitcode.MARKER.encode() + b"="
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            entries = f.read().split(b"\0")
    except OSError:
        return None
    for entry in entries:
        if entry.startswith(prefix):
            try:
                return int(entry[len(prefix) :])
            except ValueError:
                return None
    return None


def wrappers_of(status_path: Path) -> list[tuple[int, float]]:
    """(pid, create_time) of every exit-status wrapper running for this status file:
    found by its command line, so a wrapper the job record never learned of (the
    daemon died before saving it) is found too."""
    want = os.fsencode(str(status_path.absolute()))
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if want in argv and any(arg.endswith(b"exitcode.py") for arg in argv[:4]):
            ct = create_time(int(name))
            if ct is not None:
                found.append((int(name), ct))
    return found
