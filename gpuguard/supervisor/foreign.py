"""Whether gpuguard may send the checkpoint signal to a process it did not start.

A process that holds a faulted GPU but is no gpuguard job gets the checkpoint
signal so it can save its work. The default checkpoint signal, SIGUSR1,
terminates a process that has no handler for it, so sending it blindly would
kill monitoring agents (nv-hostengine, dcgm-exporter, nvidia-persistenced) and
users' notebooks. A foreign holder is therefore signalled only when
/proc/PID/status says it catches the signal (`SigCgt`) and its name is not on
`[jobs] foreign_never_signal`; the signal goes by pidfd to the very process
that was checked.

`decide` is pure (status text and names in, verdict out); `judge` reads /proc.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

from gpuguard.supervisor.pids import signal_verified

COMM_LEN = 15  # the kernel keeps this many characters of a process name (TASK_COMM_LEN - 1)
UNKNOWN = "name unknown"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with one foreign holder: `send` the signal or not, and why not."""

    name: str  # the process name for messages; UNKNOWN when it could not be read
    send: bool
    reason: str  # empty when send is True


def signal_mask(status_text: str, field: str = "SigCgt") -> int | None:
    """The hex signal mask of one /proc/PID/status field (SigCgt, SigIgn, SigBlk...),
    or None when the field is missing or not hex. Bit signum-1 stands for signal signum."""
    prefix = f"{field}:"
    for line in status_text.splitlines():
        if line.startswith(prefix):
            try:
                return int(line[len(prefix) :].strip(), 16)
            except ValueError:
                return None
    return None


def in_mask(mask: int, sig: int) -> bool:
    return sig >= 1 and bool(mask >> (sig - 1) & 1)


def listed(names: Iterable[str], never: Collection[str]) -> str | None:
    """The first of the process's names that `never` lists, or None.

    A 15-character name is the kernel's truncated comm, so it matches a longer
    listed name that starts with it (nvidia-persiste -> nvidia-persistenced).
    """
    for name in names:
        if not name:
            continue
        if name in never:
            return name
        if len(name) == COMM_LEN:
            for entry in never:
                if entry.startswith(name):
                    return entry
    return None


def decide(
    status_text: str | None, names: list[str], sig: signal.Signals, never: Collection[str], unread_why: str = ""
) -> Verdict:
    """The verdict from what /proc said. `status_text` None: the status could not be
    read (`unread_why` says why); `names`: the process's names, the one for messages first."""
    name = names[0] if names else UNKNOWN
    hit = listed(names, never)
    if hit is not None:
        return Verdict(name, False, f"{hit} is on [jobs] foreign_never_signal")
    if status_text is None:
        why = f" ({unread_why})" if unread_why else ""
        return Verdict(name, False, f"its /proc status could not be read{why}, so it is not known to handle {sig.name}")
    caught = signal_mask(status_text, "SigCgt")
    if caught is None:
        return Verdict(name, False, f"its /proc status has no SigCgt line, so it is not known to handle {sig.name}")
    if in_mask(caught, sig):
        return Verdict(name, True, "")
    ignored = signal_mask(status_text, "SigIgn")
    if ignored is not None and in_mask(ignored, sig):
        return Verdict(name, False, f"it ignores {sig.name}, so the signal would do nothing")
    return Verdict(name, False, f"it does not handle {sig.name}, which would kill it")


def process_names(proc: psutil.Process) -> list[str]:
    """psutil's name, then the basenames of the executable and of argv[0]; those readable, once each."""
    names: list[str] = []
    for read in (proc.name, lambda: os.path.basename(proc.exe()), lambda: os.path.basename((proc.cmdline() or [""])[0])):
        try:
            name = read()
        except (psutil.Error, OSError):
            continue
        if name and name not in names:
            names.append(name)
    return names


def judge(pid: int, sig: signal.Signals, never: Collection[str], proc_root: Path = Path("/proc")) -> tuple[Verdict, float | None]:
    """The verdict for a live pid, and its create time (None when it is gone),
    which `send` needs so that a reused pid is never signalled."""
    try:
        proc = psutil.Process(pid)
        create_time = proc.create_time()
    except psutil.NoSuchProcess:
        return Verdict(UNKNOWN, False, "it exited before it could be checked"), None
    except psutil.Error as exc:
        return Verdict(UNKNOWN, False, f"it could not be inspected ({type(exc).__name__})"), None
    names = process_names(proc)
    try:
        text = (proc_root / str(pid) / "status").read_text()
    except FileNotFoundError:
        return Verdict(names[0] if names else UNKNOWN, False, "it exited before it could be checked"), None
    except OSError as exc:
        return decide(None, names, sig, never, exc.strerror or str(exc)), create_time
    if not proc.is_running():  # gone, or the text read is a newer process's under a reused pid
        return Verdict(names[0] if names else UNKNOWN, False, "it exited before it could be checked"), None
    return decide(text, names, sig, never), create_time


def send(pid: int, create_time: float, sig: signal.Signals) -> str | None:
    """Signal the process judged, never another under a reused pid; None when sent, else why not."""
    try:
        if signal_verified(pid, create_time, sig):
            return None
    except OSError as exc:
        return f"could not signal it: {exc.strerror or exc}"
    return "it exited before the signal was sent"
