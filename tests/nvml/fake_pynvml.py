"""A fake `pynvml` module for tests: no driver, no GPU, no MagicMock.

It re-exports the REAL binding's exception classes, constants and ctypes
structures, and answers the functions gpuguard calls from per-GPU values a
test sets: an error code per function, a function that hangs until released,
a lost GPU, a function the driver lacks, a function the binding lacks.
Handles are real `c_nvmlDevice_t` pointers, as the real binding hands out.
"""

from __future__ import annotations

import ctypes
import queue
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pynvml as real

HANDLE_BASE = 0x1000  # GPU i's handle points at HANDLE_BASE + i (never dereferenced)
HANG_LIMIT_S = 10.0  # a hung call gives up by itself, so no test leaves a thread behind for long

ALL_EVENTS = (
    real.nvmlEventTypeXidCriticalError | real.nvmlEventTypeDoubleBitEccError | real.nvmlEventTypeSingleBitEccError
)


@dataclass
class FakeGpu:
    """What one fake GPU answers. Every field may be changed between polls."""

    uuid: str
    pci_bus_id: str = "00000000:3B:00.0"
    name: str = "NVIDIA H200"
    serial: str = "1650924000001"
    memory_total: int = 141 * 1024**3
    memory_used: int = 2 * 1024**3
    gpu_util: int = 40
    mem_util: int = 20
    temperature: int = 55
    power_mw: int = 350_250
    power_limit_mw: int = 700_000
    sm_clock: int = 1980
    clock_reasons: int = 0
    ecc_mode: tuple[int, int] = (1, 1)  # current, pending
    ecc: dict[tuple[int, int], int] = field(default_factory=dict)  # (error type, counter type) -> count
    retired_pages: dict[int, list[int]] = field(default_factory=dict)  # cause -> page addresses
    retired_pending: int = 0
    remapped_rows: tuple[int, int, int, int] = (0, 0, 0, 0)  # corr, unc, pending, failure
    pcie_replay: int = 0
    nvlinks: dict[int, int] = field(default_factory=dict)  # link -> state; {}: no NVLink
    nvlink_errors: dict[tuple[int, int], int] = field(default_factory=dict)  # (link, counter) -> count
    recovery_action: int | None = 0  # None: the driver does not know the field
    processes: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, used memory)
    supported_events: int = ALL_EVENTS
    lost: bool = False  # every device call: NVML_ERROR_GPU_IS_LOST
    errors: dict[str, int] = field(default_factory=dict)  # function -> NVML_ERROR_* it returns
    hangs: dict[str, threading.Event] = field(default_factory=dict)  # function -> blocks until set
    registered_events: int = 0


class _EventSet:
    def __init__(self) -> None:
        self.freed = False


class FakeNvml:
    """Stands in for the `pynvml` module (pass it as `nvml_module`)."""

    def __init__(
        self,
        gpus: list[FakeGpu],
        *,
        init_error: int | None = None,
        driver_missing: set[str] | None = None,
        binding_lacks: set[str] | None = None,
    ) -> None:
        self.gpus = gpus
        self.init_error = init_error  # NVML_ERROR_* that nvmlInit returns
        self.driver_missing = driver_missing or set()  # -> NVML_ERROR_FUNCTION_NOT_FOUND
        self.binding_lacks = binding_lacks or set()  # hasattr() is False
        self.initialized = False
        self.init_calls = 0
        self.shutdown_calls = 0
        self.calls: Counter[tuple[str, int | None]] = Counter()  # (function, GPU index)
        self.event_sets: list[_EventSet] = []
        self._events: queue.SimpleQueue[tuple[int, int, int]] = queue.SimpleQueue()

    def __getattribute__(self, name: str) -> Any:
        if name in object.__getattribute__(self, "binding_lacks"):
            raise AttributeError(f"module 'pynvml' has no attribute {name!r}")
        return object.__getattribute__(self, name)

    # --- test controls ---------------------------------------------------
    def emit(self, index: int, event_type: int, data: int = 0) -> None:
        """Queue an event, delivered if the GPU registered its type."""
        self._events.put((index, event_type, data))

    def release(self) -> None:
        """Let every hung call return."""
        for gpu in self.gpus:
            for event in gpu.hangs.values():
                event.set()

    # --- plumbing --------------------------------------------------------
    def _enter(self, fn: str, index: int | None = None) -> None:
        self.calls[(fn, index)] += 1
        if not self.initialized:
            raise real.NVMLError(real.NVML_ERROR_UNINITIALIZED)
        if fn in self.driver_missing:
            raise real.NVMLError(real.NVML_ERROR_FUNCTION_NOT_FOUND)

    def _gpu(self, fn: str, handle: Any) -> FakeGpu:
        index = ctypes.cast(handle, ctypes.c_void_p).value - HANDLE_BASE
        self._enter(fn, index)
        gpu = self.gpus[index]
        hang = gpu.hangs.get(fn)
        if hang is not None:
            hang.wait(HANG_LIMIT_S)
        if gpu.lost:
            raise real.NVMLError(real.NVML_ERROR_GPU_IS_LOST)
        if fn in gpu.errors:
            raise real.NVMLError(gpu.errors[fn])
        return gpu

    # --- system ------------------------------------------------------------
    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise real.NVMLError(self.init_error)
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.shutdown_calls += 1
        self.initialized = False

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        return "570.124.06"

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
        self._enter("nvmlSystemGetCudaDriverVersion_v2")
        return 12080

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._enter("nvmlSystemGetCudaDriverVersion")
        return 12080

    def nvmlSystemGetNVMLVersion(self) -> str:
        self._enter("nvmlSystemGetNVMLVersion")
        return "12.570.124.06"

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    # --- device: static ----------------------------------------------------
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        handle = ctypes.cast(HANDLE_BASE + index, real.c_nvmlDevice_t)
        self._gpu("nvmlDeviceGetHandleByIndex", handle)
        return handle

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return self._gpu("nvmlDeviceGetUUID", handle).uuid

    def nvmlDeviceGetPciInfo(self, handle: Any) -> Any:
        info = real.nvmlPciInfo_t()
        info.busId = self._gpu("nvmlDeviceGetPciInfo", handle).pci_bus_id.encode()
        return info

    def nvmlDeviceGetName(self, handle: Any) -> str:
        return self._gpu("nvmlDeviceGetName", handle).name

    def nvmlDeviceGetSerial(self, handle: Any) -> str:
        return self._gpu("nvmlDeviceGetSerial", handle).serial

    # --- device: metrics ---------------------------------------------------
    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        gpu = self._gpu("nvmlDeviceGetUtilizationRates", handle)
        return real.c_nvmlUtilization_t(gpu=gpu.gpu_util, memory=gpu.mem_util)

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any:
        gpu = self._gpu("nvmlDeviceGetMemoryInfo", handle)
        free = gpu.memory_total - gpu.memory_used
        return real.c_nvmlMemory_t(total=gpu.memory_total, free=free, used=gpu.memory_used)

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        assert sensor == real.NVML_TEMPERATURE_GPU
        return self._gpu("nvmlDeviceGetTemperature", handle).temperature

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        return self._gpu("nvmlDeviceGetPowerUsage", handle).power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        return self._gpu("nvmlDeviceGetEnforcedPowerLimit", handle).power_limit_mw

    def nvmlDeviceGetClockInfo(self, handle: Any, clock_type: int) -> int:
        assert clock_type == real.NVML_CLOCK_SM
        return self._gpu("nvmlDeviceGetClockInfo", handle).sm_clock

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int:
        return self._gpu("nvmlDeviceGetCurrentClocksEventReasons", handle).clock_reasons

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: Any) -> int:
        return self._gpu("nvmlDeviceGetCurrentClocksThrottleReasons", handle).clock_reasons

    def nvmlDeviceGetEccMode(self, handle: Any) -> list[int]:
        return list(self._gpu("nvmlDeviceGetEccMode", handle).ecc_mode)

    def nvmlDeviceGetTotalEccErrors(self, handle: Any, error_type: int, counter_type: int) -> int:
        return self._gpu("nvmlDeviceGetTotalEccErrors", handle).ecc.get((error_type, counter_type), 0)

    def nvmlDeviceGetRetiredPages(self, handle: Any, cause: int) -> list[int]:
        return list(self._gpu("nvmlDeviceGetRetiredPages", handle).retired_pages.get(cause, []))

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: Any) -> int:
        return self._gpu("nvmlDeviceGetRetiredPagesPendingStatus", handle).retired_pending

    def nvmlDeviceGetRemappedRows(self, handle: Any) -> tuple[int, int, int, int]:
        return self._gpu("nvmlDeviceGetRemappedRows", handle).remapped_rows

    def nvmlDeviceGetPcieReplayCounter(self, handle: Any) -> int:
        return self._gpu("nvmlDeviceGetPcieReplayCounter", handle).pcie_replay

    def nvmlDeviceGetNvLinkState(self, handle: Any, link: int) -> int:
        gpu = self._gpu("nvmlDeviceGetNvLinkState", handle)
        if not gpu.nvlinks:
            raise real.NVMLError(real.NVML_ERROR_NOT_SUPPORTED)
        if link not in gpu.nvlinks:
            raise real.NVMLError(real.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.nvlinks[link]

    def nvmlDeviceGetNvLinkErrorCounter(self, handle: Any, link: int, counter: int) -> int:
        return self._gpu("nvmlDeviceGetNvLinkErrorCounter", handle).nvlink_errors.get((link, counter), 0)

    def nvmlDeviceGetFieldValues(self, handle: Any, field_ids: list[int]) -> Any:
        gpu = self._gpu("nvmlDeviceGetFieldValues", handle)
        values = (real.c_nvmlFieldValue_t * len(field_ids))()
        for value, field_id in zip(values, field_ids, strict=True):
            value.fieldId = field_id
            if field_id == real.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION and gpu.recovery_action is not None:
                value.valueType = real.NVML_VALUE_TYPE_UNSIGNED_INT
                value.value.uiVal = gpu.recovery_action
                value.nvmlReturn = real.NVML_SUCCESS
            else:
                value.nvmlReturn = real.NVML_ERROR_NOT_SUPPORTED
        return values

    def _processes(self, fn: str, handle: Any) -> list[Any]:
        gpu = self._gpu(fn, handle)
        return [real.nvmlFriendlyObject({"pid": pid, "usedGpuMemory": used}) for pid, used in gpu.processes]

    def nvmlDeviceGetComputeRunningProcesses_v3(self, handle: Any) -> list[Any]:
        return self._processes("nvmlDeviceGetComputeRunningProcesses_v3", handle)

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle: Any) -> list[Any]:
        return self._processes("nvmlDeviceGetComputeRunningProcesses_v2", handle)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]:
        return self._processes("nvmlDeviceGetComputeRunningProcesses", handle)

    # --- events --------------------------------------------------------------
    def nvmlEventSetCreate(self) -> _EventSet:
        self._enter("nvmlEventSetCreate")
        event_set = _EventSet()
        self.event_sets.append(event_set)
        return event_set

    def nvmlEventSetFree(self, event_set: _EventSet) -> None:
        self._enter("nvmlEventSetFree")
        event_set.freed = True

    def nvmlDeviceGetSupportedEventTypes(self, handle: Any) -> int:
        return self._gpu("nvmlDeviceGetSupportedEventTypes", handle).supported_events

    def nvmlDeviceRegisterEvents(self, handle: Any, event_types: int, event_set: _EventSet) -> None:
        gpu = self._gpu("nvmlDeviceRegisterEvents", handle)
        assert not event_set.freed
        if event_types & ~gpu.supported_events:
            raise real.NVMLError(real.NVML_ERROR_NOT_SUPPORTED)
        gpu.registered_events |= event_types

    def _wait(self, fn: str, event_set: _EventSet, timeout_ms: int) -> Any:
        self._enter(fn)
        assert not event_set.freed, "waiting on a freed event set"
        while True:
            try:
                index, event_type, data = self._events.get(timeout=timeout_ms / 1000)
            except queue.Empty:
                raise real.NVMLError(real.NVML_ERROR_TIMEOUT) from None
            if self.gpus[index].registered_events & event_type:
                out = real.c_nvmlEventData_t()
                out.device = ctypes.cast(HANDLE_BASE + index, real.c_nvmlDevice_t)
                out.eventType = event_type
                out.eventData = data
                return out

    def nvmlEventSetWait_v2(self, event_set: _EventSet, timeout_ms: int) -> Any:
        return self._wait("nvmlEventSetWait_v2", event_set, timeout_ms)

    def nvmlEventSetWait(self, event_set: _EventSet, timeout_ms: int) -> Any:
        return self._wait("nvmlEventSetWait", event_set, timeout_ms)


# the real binding's exceptions, constants and structures, as `pynvml` has them
for _name in dir(real):
    if _name.startswith(("NVML_", "NVMLError", "nvmlEventType", "nvmlClocks", "c_nvml")) or _name in (
        "NVMLLibraryMismatchError",
        "nvmlPciInfo_t",
        "nvmlFriendlyObject",
    ):
        setattr(FakeNvml, _name, getattr(real, _name))
del _name


def make_gpus(count: int) -> list[FakeGpu]:
    """`count` distinct healthy GPUs."""
    return [
        FakeGpu(uuid=f"GPU-0000000{i}-1111-2222-3333-44444444444{i}", pci_bus_id=f"00000000:{0x18 + i:02X}:00.0")
        for i in range(count)
    ]
