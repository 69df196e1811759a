"""Processes gpuguard did not start that hold a faulted GPU.

Each gets the checkpoint signal once per fault, and only when it handles it
and is not on [jobs] foreign_never_signal (the signal's default action would
kill it); either way an event names it. `to_judge` is pure; the rest reads
/proc and sends signals through `foreign`.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Collection, Iterable

import psutil

from gpuguard.events import Event, EventKind
from gpuguard.health.types import GpuState, Severity
from gpuguard.supervisor import foreign
from gpuguard.supervisor.ports import Facts, GpuFacts, Settings


def to_judge(
    facts: Facts, ours: Collection[int], judged: set[tuple[str, int]]
) -> tuple[set[tuple[str, int]], list[tuple[GpuFacts, int]]]:
    """The (GPU, pid) pairs still remembered as judged, and the holders of faulted
    GPUs to judge now: not ours, not judged during this fault."""
    faulted = {uuid: f for uuid, f in facts.items() if f.health == GpuState.FAULTED}
    # once per fault: a GPU that recovered and faults again asks its holders again
    kept = {(uuid, pid) for uuid, pid in judged if uuid in faulted}
    todo = [(f, pid) for uuid, f in faulted.items() for pid in f.holders if pid not in ours and (uuid, pid) not in kept]
    return kept, todo


class ForeignHolders:
    def __init__(self, record: Callable[[Event], Event]) -> None:
        self._record = record
        self.judged: set[tuple[str, int]] = set()  # (GPU uuid, pid): each holder once per fault

    def tick(self, facts: Facts, ours: Iterable[int], settings: Settings) -> None:
        sig = signal.Signals[settings.checkpoint_signal]
        never = frozenset(settings.foreign_never_signal)
        self.judged, todo = to_judge(facts, set(ours) | {os.getpid()}, self.judged)
        for gpu, pid in todo:
            if not psutil.pid_exists(pid):  # gone since the poll listed it
                continue
            self.judged.add((gpu.uuid, pid))
            verdict, create_time = foreign.judge(pid, sig, never)
            why_not = verdict.reason
            if verdict.send and create_time is not None:
                why_not = foreign.send(pid, create_time, sig) or ""
            who = f"pid {pid} ({verdict.name}, not a gpuguard job) holds faulted GPU {gpu.index}"
            data = {"pid": pid, "process": verdict.name, "signal": sig.name, "signalled": not why_not}
            if why_not:
                kind, message = EventKind.FOREIGN_NOT_SIGNALLED, f"{who}: not signalled: {why_not}; it is not restarted"
            else:
                kind, message = EventKind.CHECKPOINT_REQUESTED, f"{who}: sent {sig.name}, which it handles; it is not restarted"
            self._record(Event(kind=kind, severity=Severity.WARNING, gpu=gpu.uuid, data=data, message=message))
