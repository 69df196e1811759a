"""The processes on a simulated GPU: the attached pids and their live descendants.

Their CPU use stands in for GPU utilisation, so a trainer that is stopped
(SIGSTOP) or stuck shows an idle GPU, as it would on real hardware.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import psutil

from gpuguard.nvml.types import GpuProcess

ROOT_MEMORY_BYTES = 8 * 1024**3  # the trainer holds the CUDA context and the model
CHILD_MEMORY_BYTES = 512 * 1024**2  # a worker that touched CUDA


@dataclass(frozen=True, slots=True)
class ProcessSample:
    processes: tuple[GpuProcess, ...]  # roots first, then their descendants
    busy_pct: float  # summed CPU percent since the previous sample, capped at 100


class ProcessTracker:
    """One GPU's attached processes. attach/detach come from any thread; sample()
    from one thread at a time (the GPU's deadline lane), since psutil's
    cpu_percent measures from one call to the next on the same Process object."""

    def __init__(self) -> None:
        self._roots: dict[int, psutil.Process] = {}
        self._lock = threading.Lock()
        self._seen: dict[int, psutil.Process] = {}

    def attach(self, pid: int) -> None:
        """A pid that is already gone is ignored: it would drop out at once anyway."""
        if pid <= 0:
            raise ValueError(f"not a process id: {pid}")
        try:
            proc = psutil.Process(pid)  # remembers its start time, so a reused pid is not mistaken
        except psutil.NoSuchProcess:
            return
        with self._lock:
            self._roots.setdefault(pid, proc)

    def detach(self, pid: int) -> None:
        with self._lock:
            self._roots.pop(pid, None)

    def first_alive(self) -> psutil.Process | None:
        """The process an Xid line names: the first attached one still running."""
        with self._lock:
            roots = list(self._roots.values())
        return next((p for p in roots if _alive(p)), None)

    def sample(self) -> ProcessSample:
        with self._lock:
            roots = dict(self._roots)
        members: dict[int, psutil.Process] = {}
        for pid, root in roots.items():
            if not _alive(root):
                with self._lock:
                    if self._roots.get(pid) is root:
                        del self._roots[pid]
                continue
            members.setdefault(pid, root)
            try:
                children = root.children(recursive=True)
            except psutil.Error:
                children = []
            for child in children:
                members.setdefault(child.pid, child)
        busy = 0.0
        seen: dict[int, psutil.Process] = {}
        for pid, proc in members.items():
            known = self._seen.get(pid)
            if known is not None and known == proc:  # psutil compares pid and start time
                proc = known
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                busy += proc.cpu_percent(interval=None)
            except psutil.Error:
                continue
            seen[pid] = proc
        self._seen = seen
        listed = tuple(GpuProcess(pid, ROOT_MEMORY_BYTES if pid in roots else CHILD_MEMORY_BYTES) for pid in seen)
        return ProcessSample(listed, min(busy, 100.0))


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
