"""The NVML backend: real GPUs through nvidia-ml-py (`pynvml`).

This module holds the lifecycle (init, inventory, shutdown) and hands a poll
and the event waits to snapshot.py and events.py; every NVML call of the
three goes through the one door (door.py). Each GPU's reads run on that GPU's
lane, all GPUs under one shared deadline, so a GPU whose driver hangs costs
one DEADLINE finding and never the whole poll.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Literal

import structlog

from gpuguard.nvml.backend import BackendUnavailable
from gpuguard.nvml.deadline import DeadlineExceeded, DeadlineRunner
from gpuguard.nvml.door import GLOBAL_LANE, Gpu, NvmlDoor
from gpuguard.nvml.errors import NVML_ERRORS, unavailable_reason
from gpuguard.nvml.events import EVENT_SLICE_S, NvmlEvents
from gpuguard.nvml.snapshot import SnapshotReader
from gpuguard.nvml.types import DriverInfo, FindingKind, GpuInfo, GpuSnapshot, NvmlEvent, NvmlFinding

__all__ = ["EVENT_SLICE_S", "NvmlBackend"]

log = structlog.get_logger(__name__)

CUDA_VERSION_FNS = ("nvmlSystemGetCudaDriverVersion_v2", "nvmlSystemGetCudaDriverVersion")


class NvmlBackend:
    """The `Backend` over libnvidia-ml."""

    kind: Literal["nvml"] = "nvml"
    simulator: None = None  # real GPUs take no injected faults (Backend.simulator)

    def __init__(
        self,
        timeout_s: float = 2.0,
        runner: DeadlineRunner | None = None,
        nvml_module: object = None,
        open_timeout_s: float = 30.0,
    ) -> None:
        """`timeout_s` is the deadline of one poll of all GPUs; `open_timeout_s`
        that of nvmlInit and the inventory (a GPU without persistence mode can
        take seconds to initialise). `nvml_module` stands in for pynvml (tests)."""
        self._timeout_s = timeout_s
        self._open_timeout_s = open_timeout_s
        self._door = NvmlDoor(runner or DeadlineRunner("nvml"), nvml_module)
        self._open = False
        self._gpus: list[Gpu] = []
        self._driver = DriverInfo(None, None, None)
        self._reader = SnapshotReader(self._door)
        self._events = NvmlEvents(self._door)

    # --- lifecycle -----------------------------------------------------
    def open(self) -> None:
        """nvmlInit and the inventory. BackendUnavailable when there is no usable
        NVML; DeadlineExceeded when nvmlInit or the device count hangs."""
        if self._open:
            return
        door = self._door
        door.load()
        try:
            door.on_lane(GLOBAL_LANE, "nvmlInit", partial(door.call, "nvmlInit"), self._open_timeout_s)
        except NVML_ERRORS as exc:
            raise BackendUnavailable(unavailable_reason(exc)) from exc
        try:
            self._driver, count = door.on_lane(
                GLOBAL_LANE, "nvmlDeviceGetCount", self._read_system, self._open_timeout_s
            )
            self._gpus = self._enumerate(count)
        except BaseException:
            self._shutdown()
            raise
        self._events.start(self._gpus)
        self._open = True

    def close(self) -> None:
        """Free the event set and shut NVML down; open() may follow (GPU reset)."""
        if not self._open:
            return
        self._open = False
        self._events.stop(EVENT_SLICE_S + self._timeout_s)
        self._shutdown()

    def _shutdown(self) -> None:
        door = self._door
        try:
            door.on_lane(GLOBAL_LANE, "nvmlShutdown", partial(door.call, "nvmlShutdown"), self._timeout_s)
        except (*NVML_ERRORS, DeadlineExceeded) as exc:
            log.warning("nvml_shutdown_failed", error=str(exc))

    def _require_open(self) -> list[Gpu]:
        if not self._open:
            raise RuntimeError("the NVML backend is not open")
        return self._gpus

    # --- static facts ----------------------------------------------------
    def driver_info(self) -> DriverInfo:
        self._require_open()
        return self._driver

    def inventory(self) -> list[GpuInfo]:
        return [gpu.info for gpu in self._require_open()]

    def _read_system(self) -> tuple[DriverInfo, int]:
        door = self._door
        driver = door.call("nvmlSystemGetDriverVersion", optional=True)
        cuda = door.call(CUDA_VERSION_FNS, optional=True)
        version = door.call("nvmlSystemGetNVMLVersion", optional=True)
        cuda_version = None if cuda is None else _cuda_version(cuda)
        return DriverInfo(driver, cuda_version, version), int(door.call("nvmlDeviceGetCount"))

    def _enumerate(self, count: int) -> list[Gpu]:
        """Every GPU NVML enumerates, each read on its own lane. A GPU known
        before a close() that NVML no longer enumerates stays, as lost."""
        found = self._door.on_lanes(
            ((i, f"inventory GPU {i}", partial(self._read_static, i)) for i in range(count)), self._open_timeout_s
        )
        gpus: list[Gpu] = []
        for index, result in found.items():
            if isinstance(result, Gpu):
                gpus.append(result)
            elif isinstance(result, (*NVML_ERRORS, DeadlineExceeded)):
                log.error("nvml_gpu_unreachable", gpu_index=index, error=str(result))
            else:
                raise result
        uuids = {gpu.info.uuid for gpu in gpus}
        for old in self._gpus:
            if old.info.uuid not in uuids:
                detail = "NVML no longer enumerates this GPU"
                log.error("nvml_gpu_missing", gpu_uuid=old.info.uuid, gpu_index=old.info.index)
                lost = NvmlFinding(FindingKind.GPU_LOST, "nvmlDeviceGetHandleByIndex", detail)
                gpus.append(Gpu(old.info, None, lost=lost))
        return sorted(gpus, key=lambda gpu: gpu.info.index)

    def _read_static(self, index: int) -> Gpu:
        door = self._door
        handle = door.call("nvmlDeviceGetHandleByIndex", index)
        uuid = door.call("nvmlDeviceGetUUID", handle)
        pci_bus_id = _text(door.call("nvmlDeviceGetPciInfo", handle).busId)
        name = door.call("nvmlDeviceGetName", handle)
        serial = door.call("nvmlDeviceGetSerial", handle, optional=True)
        memory = door.call("nvmlDeviceGetMemoryInfo", handle, optional=True)
        total = None if memory is None else int(memory.total)
        return Gpu(GpuInfo(index, uuid, pci_bus_id, name, serial, total), handle)

    # --- polling -----------------------------------------------------------
    def poll(self) -> list[GpuSnapshot]:
        gpus = self._require_open()
        reader = self._reader
        live = [gpu for gpu in gpus if gpu.handle is not None]
        results = self._door.on_lanes(
            ((gpu.info.index, f"poll GPU {gpu.info.index}", partial(reader.read, gpu)) for gpu in live),
            self._timeout_s,
        )
        now = time.time()
        return [reader.snapshot(gpu, results.get(gpu.info.index), now) for gpu in gpus]

    # --- events ------------------------------------------------------------
    def registered_events(self) -> dict[str, list[str]]:
        """Per GPU UUID, the event types NVML accepted ("xid", "ecc_dbe", "ecc_sbe")."""
        return self._events.registered()

    def wait_events(self, timeout_s: float) -> list[NvmlEvent]:
        """Block up to timeout_s (by design: the daemon calls this on its own thread)."""
        self._require_open()
        return self._events.wait(timeout_s)


def _text(value: str | bytes) -> str:
    """Older bindings hand back bytes where newer ones decode (the door decodes results, not their fields)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _cuda_version(value: int) -> str:
    """12040 -> "12.4" (nvmlSystemGetCudaDriverVersion's encoding)."""
    return f"{value // 1000}.{value % 1000 // 10}"
