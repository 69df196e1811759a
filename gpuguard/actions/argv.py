"""Commands from the config (node hooks, Slurm's drain and requeue): an argv
template filled in and run with a timeout, never through a shell.

Each template argument is filled with str.format_map, so text from a fault
(an Xid message, an operator's exclude reason, a job's environment) only ever
becomes one whole argument. The command runs in its own session: a timeout
kills its whole process group. The config loader has already refused unknown
or malformed placeholders.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

OUTPUT_TAIL_CHARS = 400
READ_AFTER_KILL_S = 2.0  # after SIGKILL, how long to wait for the pipe to close


@dataclass(frozen=True, slots=True)
class ArgvRun:
    """How one run went: `exit_code` None when it could not start or timed out."""

    argv: tuple[str, ...]
    exit_code: int | None
    duration_s: float
    outcome: str  # "exited 0", "timed out after 30 s and was killed", "could not start: ..."
    output_tail: str  # the end of its stdout and stderr, stripped
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def short_hostname() -> str:
    """This node's name as schedulers know it: the host part, without the domain."""
    return socket.gethostname().split(".", 1)[0]


def fill_argv(template: Sequence[str], values: Mapping[str, str]) -> list[str]:
    """The argv of one run: every template argument with its placeholders filled in."""
    return [arg.format_map(values) for arg in template]


def command_env() -> dict[str, str]:
    """The daemon's environment without systemd's notify/watchdog variables,
    so a command can never speak to systemd for the daemon."""
    return {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET" and not k.startswith("WATCHDOG_")}


def run_argv(argv: Sequence[str], timeout_s: float, *, user: tuple[int, int, tuple[int, ...]] | None = None) -> ArgvRun:
    """Run `argv` (stdin empty, stdout and stderr together) for at most `timeout_s`,
    then SIGKILL its process group. `user` (uid, gid, groups) runs it as that user
    (the daemon must be root for that); None runs it as the daemon's user."""
    argv = tuple(argv)
    started = time.monotonic()
    ids = user if user is not None and user[0] != os.geteuid() else None  # only root may switch
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=command_env(),
            start_new_session=True,  # its own process group, so a timeout kills all of it
            user=ids[0] if ids else None,
            group=ids[1] if ids else None,
            extra_groups=list(ids[2]) if ids else None,
        )
    except (OSError, ValueError, subprocess.SubprocessError) as exc:  # ValueError: a NUL byte in an argument
        why = getattr(exc, "strerror", None) or exc
        return ArgvRun(argv, None, time.monotonic() - started, f"could not start: {why}", "")
    timed_out = False
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):  # it ended just now
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            output, _ = proc.communicate(timeout=READ_AFTER_KILL_S)
        except subprocess.TimeoutExpired:  # a grandchild left its group and holds the pipe
            proc.kill()
            proc.wait()
            output = b""
    duration = time.monotonic() - started
    tail = output.decode("utf-8", "replace").strip()[-OUTPUT_TAIL_CHARS:]
    if timed_out:
        return ArgvRun(argv, None, duration, f"timed out after {timeout_s:g} s and was killed", tail, timed_out=True)
    return ArgvRun(argv, proc.returncode, duration, f"exited {proc.returncode}", tail)
