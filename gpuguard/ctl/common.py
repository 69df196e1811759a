"""What every gpuguardctl module shares: exit codes, usage errors and the
daemon connection (one request, or polls that outlast a daemon restart)."""

from __future__ import annotations

import select
import sys
import time
from pathlib import Path
from typing import Any

from gpuguard.control.client import DaemonUnreachable, request

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as the shell shows a command ended by Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as the shell shows `cat` cut short by `head`
CHECK_EXIT = {"healthy": 0, "unhealthy": 1, "unknown": 2}

# how long the commands that keep running wait for a daemon that went away
# (systemctl restart gpuguard) before they give up with exit 3
UNREACHABLE_GRACE_S = 60.0


class UsageError(Exception):
    """A usage problem found after parsing (exit 2)."""


def warn(message: str) -> None:
    """One line on stderr, named after the program."""
    print(f"gpuguardctl: {message}", file=sys.stderr, flush=True)


def pause(seconds: float) -> None:
    """Sleep, but raise BrokenPipeError at once when stdout is a pipe whose
    reader has gone: `events -f | grep -m1 xid` ends with grep, as `tail -f`
    does, not at the next write."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # not a real file (a test's capture)
        time.sleep(seconds)
        return
    poller = select.poll()
    poller.register(fd, 0)  # no events asked: only error and hang-up are reported
    if poller.poll(seconds * 1000):
        raise BrokenPipeError(f"stdout (fd {fd}) has no reader")


SLOW_REPLY_S = {"reset": 600.0}  # commands whose reply waits for a slow action


class Daemon:
    """The daemon behind one socket path."""

    def __init__(self, path: Path, grace_s: float = UNREACHABLE_GRACE_S) -> None:
        self.path = path
        self.grace_s = grace_s
        self._down_since: float | None = None

    def call(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """One request; DaemonUnreachable or CommandFailed when it fails. A reset answers
        only when its command has run ([reset] timeout_s, 120 s by default)."""
        return request(self.path, cmd, args or {}, timeout_s=SLOW_REPLY_S.get(cmd, 10.0))

    def poll(self, cmd: str, args: dict[str, Any] | None = None) -> Any | None:
        """One request of a loop: None while the daemon is away (said once on
        stderr), DaemonUnreachable once it has been away for `grace_s`."""
        try:
            result = self.call(cmd, args)
        except DaemonUnreachable as exc:
            now = time.monotonic()
            if self._down_since is None:
                self._down_since = now
                warn(f"{exc}; trying again for {self.grace_s:g} s")
            if now - self._down_since >= self.grace_s:
                raise
            return None
        if self._down_since is not None:
            self._down_since = None
            warn(f"gpuguardd at {self.path} answers again")
        return result
