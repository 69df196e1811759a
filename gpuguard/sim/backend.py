"""`SimulatedBackend`: N simulated GPUs behind the `Backend` protocol (`gpuguardd --simulate N`).

Reads go through the same `DeadlineRunner` as the real NVML backend (one lane
per GPU, one shared deadline), so an injected NVML hang is caught by the same
machinery. Xids reach the daemon through a simulated kernel log, as on real
hardware, and, where real drivers deliver them, as NVML events.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Literal

import psutil

from gpuguard.nvml.deadline import DeadlineExceeded, DeadlineRunner
from gpuguard.nvml.types import DriverInfo, FindingKind, GpuInfo, GpuSnapshot, NvmlEvent, NvmlFinding
from gpuguard.sim.faults import PROCESS_CONTROLS, XID_DBE, XID_WITHOUT_NVML_EVENT, parse_fault, xid_text
from gpuguard.sim.gpu import GpuIsLost, SimGpu
from gpuguard.sim.identity import sim_info
from gpuguard.sim.kmsg import PRIO_ERR, PRIO_INFO, KernelLogWriter, mapping_record, xid_record

DRIVER = DriverInfo(driver_version="550.90.07", cuda_driver_version="12.4", nvml_version="12.550.90.07")


class SimulatedBackend:
    """Simulated hardware, not a session: open()/close() keep every GPU and its faults."""

    kind: Literal["nvml", "simulated"] = "simulated"

    def __init__(
        self, count: int, kmsg_path: Path, timeout_s: float = 2.0, runner: DeadlineRunner | None = None
    ) -> None:
        if count < 1:
            raise ValueError(f"a simulation needs at least one GPU (got {count})")
        self.timeout_s = timeout_s
        self._gpus = [SimGpu(sim_info(i)) for i in range(count)]
        self._by_uuid = {g.info.uuid: g for g in self._gpus}
        self._runner = runner or DeadlineRunner("sim")
        self._log = KernelLogWriter(kmsg_path)
        self._mappings_logged = False
        self._lock = threading.Lock()
        self._unblocked = threading.Condition(self._lock)  # wakes reads held by nvml-hang
        self._events: deque[NvmlEvent] = deque()
        self._event_ready = threading.Condition()

    # --- Backend protocol ------------------------------------------------
    @property
    def simulator(self) -> SimulatedBackend:
        """Simulated GPUs take injected faults, hand-set holders and in-process resets."""
        return self

    def open(self) -> None:
        """Nothing to load: the simulated driver is always there."""

    def close(self) -> None:
        """Nothing to release: there are no handles, and the GPUs outlive a session."""

    def driver_info(self) -> DriverInfo:
        return DRIVER

    def inventory(self) -> list[GpuInfo]:
        return [g.info for g in self._gpus]

    def poll(self) -> list[GpuSnapshot]:
        calls = [(g.info.index, "poll", partial(self._read, g)) for g in self._gpus]
        results = self._runner.map(calls, self.timeout_s)
        finished = time.time()
        return [self._snapshot(g, results[g.info.index], finished) for g in self._gpus]

    def wait_events(self, timeout_s: float) -> list[NvmlEvent]:
        with self._event_ready:
            self._event_ready.wait_for(lambda: self._events, timeout=max(timeout_s, 0.0))
            events = list(self._events)
            self._events.clear()
        return events

    # --- simulator controls ------------------------------------------------
    def attach(self, uuid: str, pid: int) -> None:
        """Show pid and its live descendants on this GPU until they exit or are detached."""
        self._gpu_by_uuid(uuid).processes.attach(pid)

    def detach(self, uuid: str, pid: int) -> None:
        self._gpu_by_uuid(uuid).processes.detach(pid)

    def inject(self, index: int, fault: str, value: str | None = None) -> str:
        """Put a fault on GPU `index`; returns one line saying what it did.

        Raises ValueError for a bad index, an unknown fault or a bad value,
        before anything changes.
        """
        gpu = self._gpu(index)
        parsed = parse_fault(fault, value)
        if parsed.name in PROCESS_CONTROLS:
            pid = int(parsed.amount or 0)
            if parsed.name == "detach":
                gpu.processes.detach(pid)
                return f"GPU {index}: pid {pid} no longer listed"
            if not psutil.pid_exists(pid):
                raise ValueError(f"attach: no process {pid}")
            gpu.processes.attach(pid)
            return f"GPU {index}: pid {pid} listed as a process on this GPU while it runs"
        xid = int(parsed.amount or 0) if parsed.name == "xid" else XID_DBE if parsed.name == "ecc-dbe" else None
        if xid is not None:  # the log line first: the driver prints it as the fault happens
            self._log_xid(gpu, xid)
        with self._lock:
            description = gpu.apply(parsed)
            self._unblocked.notify_all()
        if parsed.name == "xid" and xid not in XID_WITHOUT_NVML_EVENT:
            self._queue_event(NvmlEvent(gpu.info.uuid, "xid", xid, time.time()))
        elif parsed.name == "ecc-dbe":
            self._queue_event(NvmlEvent(gpu.info.uuid, "ecc_dbe", 0, time.time()))
        return f"GPU {index}: {description}"

    def reset(self, index: int) -> tuple[bool, str]:
        """A GPU reset: (False, reason) for a lost GPU or one a process still uses."""
        gpu = self._gpu(index)
        busy = gpu.processes.first_alive()
        with self._lock:
            result = gpu.reset(busy.pid if busy is not None else None)
            self._unblocked.notify_all()
        return result

    def resets(self, index: int) -> int:
        """How many resets GPU `index` has had since the daemon started."""
        return self._gpu(index).resets

    # --- internals -----------------------------------------------------------
    def _gpu(self, index: int) -> SimGpu:
        if not isinstance(index, int) or not 0 <= index < len(self._gpus):
            raise ValueError(f"no simulated GPU {index!r}: the indices are 0 to {len(self._gpus) - 1}")
        return self._gpus[index]

    def _gpu_by_uuid(self, uuid: str) -> SimGpu:
        gpu = self._by_uuid.get(uuid)
        if gpu is None:
            raise ValueError(f"no simulated GPU with UUID {uuid!r}")
        return gpu

    def _read(self, gpu: SimGpu) -> GpuSnapshot:
        """One GPU's poll, on its deadline lane; blocks while an nvml-hang holds it."""
        with self._lock:
            while (left := gpu.state.nvml_hang_until - time.monotonic()) > 0:
                self._unblocked.wait(left)
        sample = gpu.processes.sample()
        with self._lock:
            return gpu.read(sample, time.monotonic())

    def _snapshot(self, gpu: SimGpu, result: GpuSnapshot | BaseException, finished: float) -> GpuSnapshot:
        if isinstance(result, GpuSnapshot):
            return replace(result, timestamp=finished)
        if isinstance(result, DeadlineExceeded):
            finding = NvmlFinding(FindingKind.DEADLINE, result.call, result.detail)
        elif isinstance(result, GpuIsLost):
            finding = NvmlFinding(FindingKind.GPU_LOST, result.call, f"GPU is lost ({result.reason})")
        else:
            finding = NvmlFinding(FindingKind.NVML_ERROR, "poll", f"{type(result).__name__}: {result}")
        return GpuSnapshot(index=gpu.info.index, uuid=gpu.info.uuid, timestamp=finished, findings=(finding,))

    def _log_xid(self, gpu: SimGpu, code: int) -> None:
        records: list[tuple[int, str]] = []
        with self._lock:
            if not self._mappings_logged:  # a real driver prints these at load
                records += [(PRIO_INFO, mapping_record(g.info.pci_bus_id, g.info.uuid)) for g in self._gpus]
                self._mappings_logged = True
        pid, name = _who(gpu)
        records.append((PRIO_ERR, xid_record(gpu.info.pci_bus_id, code, pid, name, xid_text(code))))
        self._log.write(records)

    def _queue_event(self, event: NvmlEvent) -> None:
        with self._event_ready:
            self._events.append(event)
            self._event_ready.notify_all()


def _who(gpu: SimGpu) -> tuple[int | None, str | None]:
    """The pid and name the driver names in an Xid line: a process on the GPU, if any."""
    proc = gpu.processes.first_alive()
    if proc is None:
        return None, None
    try:
        return proc.pid, proc.name()
    except psutil.Error:
        return None, None

