"""The NVML backend: real GPUs through nvidia-ml-py (`pynvml`).

Each GPU's reads run on that GPU's lane of a DeadlineRunner, all GPUs under
one shared deadline, so a GPU whose driver hangs costs one DEADLINE finding
and never the whole poll. Values NVML cannot give are None and are not asked
for again on that GPU; health facts (lost, reset required, unknown errors,
deadlines) travel as findings (errors.py classifies them).
"""

from __future__ import annotations

import ctypes
import importlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import structlog

from gpuguard.nvml.backend import BackendUnavailable
from gpuguard.nvml.deadline import DeadlineExceeded, DeadlineRunner
from gpuguard.nvml.errors import (
    NVML_ERRORS,
    classify,
    is_function_not_found,
    is_invalid_argument,
    is_timeout,
    log_function_not_found,
    unavailable_reason,
)
from gpuguard.nvml.types import DriverInfo, FindingKind, GpuInfo, GpuProcess, GpuSnapshot, NvmlEvent, NvmlFinding

log = structlog.get_logger(__name__)

GLOBAL_LANE = "global"
# the longest single nvmlEventSetWait, so close() never waits long on the event thread
EVENT_SLICE_S = 0.5
EVENT_DRAIN_MAX = 64

# nvmlClocksEventReason* bits (nvml.h; older bindings name them ClocksThrottleReason*)
HW_SLOWDOWN = 0x08
SW_THERMAL_SLOWDOWN = 0x20
HW_THERMAL_SLOWDOWN = 0x40
HW_POWER_BRAKE_SLOWDOWN = 0x80

NOT_AVAILABLE_ULL = 2**64 - 1  # NVML_VALUE_NOT_AVAILABLE as an unsigned long long

# versioned functions, newest first; the first one the driver has is kept
CLOCK_EVENT_FNS = ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons")
PROCESS_FNS = (
    "nvmlDeviceGetComputeRunningProcesses_v3",
    "nvmlDeviceGetComputeRunningProcesses_v2",
    "nvmlDeviceGetComputeRunningProcesses",
)
CUDA_VERSION_FNS = ("nvmlSystemGetCudaDriverVersion_v2", "nvmlSystemGetCudaDriverVersion")
EVENT_WAIT_FNS = ("nvmlEventSetWait_v2", "nvmlEventSetWait")

# c_nvmlValue_t member by nvmlValueType_t
_VALUE_MEMBER = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}

Values = dict[str, Any]


@dataclass(eq=False)
class _Gpu:
    """One GPU's handle and what its lane has learnt about it."""

    info: GpuInfo
    handle: Any  # None: NVML no longer enumerates it (`lost` says so)
    lost: NvmlFinding | None = None
    unsupported: set[str] = field(default_factory=set)  # reads not asked again
    nvlinks: list[int] | None = None  # the links it has, probed once
    call: str = ""  # the NVML function its lane is in (or was last in)


class NvmlBackend:
    """The `Backend` over libnvidia-ml."""

    kind: Literal["nvml"] = "nvml"

    def __init__(
        self,
        timeout_s: float = 2.0,
        runner: DeadlineRunner | None = None,
        nvml_module: Any = None,
        open_timeout_s: float = 30.0,
    ) -> None:
        """`timeout_s` is the deadline of one poll of all GPUs; `open_timeout_s`
        that of nvmlInit and the inventory (a GPU without persistence mode can
        take seconds to initialise)."""
        self._timeout_s = timeout_s
        self._open_timeout_s = open_timeout_s
        self._runner = runner or DeadlineRunner("nvml")
        self._module = nvml_module
        self._nvml: Any = None
        self._open = False
        self._gpus: list[_Gpu] = []
        self._driver = DriverInfo(None, None, None)
        self._chosen: dict[tuple[str, ...], str] = {}  # versioned family -> the one that works
        self._recovery_field: int | None = None
        self._reads: tuple[tuple[str, Callable[[_Gpu], Values | None]], ...] = ()
        self._events_lock = threading.Lock()
        self._closing = threading.Event()
        self._event_set: Any = None
        self._events_ready = False
        self._registered: dict[str, list[str]] = {}
        self._uuid_by_handle: dict[int | None, str] = {}

    # --- lifecycle -----------------------------------------------------
    def open(self) -> None:
        """nvmlInit and the inventory. BackendUnavailable when there is no usable
        NVML; DeadlineExceeded when nvmlInit or the device count hangs."""
        if self._open:
            return
        nvml = self._load()
        try:
            self._runner.call(GLOBAL_LANE, "nvmlInit", nvml.nvmlInit, self._open_timeout_s)
        except NVML_ERRORS as exc:
            raise BackendUnavailable(unavailable_reason(exc)) from exc
        self._nvml = nvml
        try:
            self._driver, count = self._runner.call(
                GLOBAL_LANE, "nvmlDeviceGetCount", self._read_system, self._open_timeout_s
            )
            self._gpus = self._enumerate(count)
        except BaseException:
            self._shutdown()
            raise
        self._recovery_field = getattr(nvml, "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION", None)
        self._reads = self._read_table()
        self._event_set, self._events_ready, self._registered, self._uuid_by_handle = None, False, {}, {}
        self._closing.clear()
        self._open = True

    def close(self) -> None:
        """Free the event set and shut NVML down; open() may follow (GPU reset)."""
        if not self._open:
            return
        self._open = False
        self._closing.set()
        if self._events_lock.acquire(timeout=EVENT_SLICE_S + self._timeout_s):
            try:
                self._free_event_set()
            finally:
                self._events_lock.release()
        else:
            log.warning("nvml_event_set_not_freed", reason="the event thread is stuck in nvmlEventSetWait")
        self._shutdown()

    def _load(self) -> Any:
        if self._module is not None:
            return self._module
        try:
            return importlib.import_module("pynvml")
        except ImportError as exc:
            raise BackendUnavailable("NVML unavailable: the nvidia-ml-py package (pynvml) is not installed") from exc

    def _shutdown(self) -> None:
        try:
            self._runner.call(GLOBAL_LANE, "nvmlShutdown", self._nvml.nvmlShutdown, self._timeout_s)
        except (*NVML_ERRORS, DeadlineExceeded) as exc:
            log.warning("nvml_shutdown_failed", error=str(exc))

    def _require_open(self) -> list[_Gpu]:
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
        n = self._nvml
        driver = self._optional("nvmlSystemGetDriverVersion", lambda: _text(n.nvmlSystemGetDriverVersion()))
        cuda = self._optional(CUDA_VERSION_FNS[0], lambda: _cuda_version(self._versioned(None, CUDA_VERSION_FNS)))
        version = self._optional("nvmlSystemGetNVMLVersion", lambda: _text(n.nvmlSystemGetNVMLVersion()))
        return DriverInfo(driver, cuda, version), int(n.nvmlDeviceGetCount())

    def _enumerate(self, count: int) -> list[_Gpu]:
        """Every GPU NVML enumerates, each read on its own lane. A GPU known
        before a close() that NVML no longer enumerates stays, as lost."""
        found = self._runner.map(
            ((i, f"inventory GPU {i}", partial(self._read_static, i)) for i in range(count)), self._open_timeout_s
        )
        gpus: list[_Gpu] = []
        for index, result in found.items():
            if isinstance(result, _Gpu):
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
                gpus.append(_Gpu(old.info, None, lost=lost))
        return sorted(gpus, key=lambda gpu: gpu.info.index)

    def _read_static(self, index: int) -> _Gpu:
        n = self._nvml
        handle = n.nvmlDeviceGetHandleByIndex(index)
        info = GpuInfo(
            index=index,
            uuid=_text(n.nvmlDeviceGetUUID(handle)),
            pci_bus_id=_text(n.nvmlDeviceGetPciInfo(handle).busId),
            name=_text(n.nvmlDeviceGetName(handle)),
            serial=self._optional("nvmlDeviceGetSerial", lambda: _text(n.nvmlDeviceGetSerial(handle))),
            memory_total_bytes=self._optional(
                "nvmlDeviceGetMemoryInfo", lambda: int(n.nvmlDeviceGetMemoryInfo(handle).total)
            ),
        )
        return _Gpu(info, handle)

    def _optional(self, call: str, read: Callable[[], Any]) -> Any:
        """read(), or None when NVML cannot give it (a health error is logged)."""
        try:
            return read()
        except NVML_ERRORS as exc:
            outcome = classify(exc, call)
            if isinstance(outcome, NvmlFinding):
                log.warning("nvml_read_failed", call=call, kind=outcome.kind.value, error=outcome.detail)
            return None

    # --- polling -----------------------------------------------------------
    def poll(self) -> list[GpuSnapshot]:
        gpus = self._require_open()
        live = [gpu for gpu in gpus if gpu.handle is not None]
        results = self._runner.map(
            ((gpu.info.index, f"poll GPU {gpu.info.index}", partial(self._read_gpu, gpu)) for gpu in live),
            self._timeout_s,
        )
        now = time.time()
        return [self._snapshot(gpu, results.get(gpu.info.index), now) for gpu in gpus]

    def _snapshot(self, gpu: _Gpu, result: Any, now: float) -> GpuSnapshot:
        index, uuid = gpu.info.index, gpu.info.uuid
        if gpu.lost is not None:
            return GpuSnapshot(index, uuid, now, findings=(gpu.lost,))
        if isinstance(result, DeadlineExceeded):
            # gpu.call is the NVML function the lane is stuck in
            return GpuSnapshot(index, uuid, now, findings=(classify(result, gpu.call or "poll"),))
        if isinstance(result, BaseException):
            raise result
        values, findings = result
        return GpuSnapshot(index, uuid, now, findings=tuple(findings), **values)

    def _read_gpu(self, gpu: _Gpu) -> tuple[Values, list[NvmlFinding]]:
        """All reads of one GPU, on its lane. A lost GPU stops at the first call."""
        values: Values = {}
        findings: list[NvmlFinding] = []
        for name, read in self._reads:
            if name in gpu.unsupported:
                continue
            try:
                got = read(gpu)
            except NVML_ERRORS as exc:
                outcome = classify(exc, gpu.call)
                if isinstance(outcome, NvmlFinding):
                    findings.append(outcome)
                    if outcome.kind is FindingKind.GPU_LOST:
                        break
                elif outcome.permanent:
                    gpu.unsupported.add(name)
                continue
            if got is None:
                gpu.unsupported.add(name)
            else:
                values.update(got)
        return values, findings

    def _read_table(self) -> tuple[tuple[str, Callable[[_Gpu], Values | None]], ...]:
        n = self._nvml
        return (
            ("utilization", self._utilization),
            ("memory", self._memory),
            ("temperature", self._temperature),
            ("power", self._power),
            ("power_limit", self._power_limit),
            ("sm_clock", self._sm_clock),
            ("clock_events", self._clock_events),
            ("ecc_mode", self._ecc_mode),
            ("ecc_volatile", partial(self._ecc_counts, counter=n.NVML_VOLATILE_ECC, prefix="volatile")),
            ("ecc_aggregate", partial(self._ecc_counts, counter=n.NVML_AGGREGATE_ECC, prefix="aggregate")),
            ("retired_pages", self._retired_pages),
            ("retired_pages_pending", self._retired_pages_pending),
            ("remapped_rows", self._remapped_rows),
            ("pcie_replay", self._pcie_replay),
            ("nvlink", self._nvlink),
            ("recovery_action", self._recovery_action),
            ("processes", self._processes),
        )

    def _call(self, gpu: _Gpu, name: str, *args: Any) -> Any:
        gpu.call = name
        return getattr(self._nvml, name)(gpu.handle, *args)

    def _versioned(self, gpu: _Gpu | None, family: tuple[str, ...], *args: Any) -> Any:
        """The newest function of `family` the binding and driver have (probed
        once), called with the GPU's handle (gpu given) and args."""
        chosen = self._chosen.get(family)
        names = [chosen] if chosen else [name for name in family if hasattr(self._nvml, name)]
        if not names:
            if gpu is not None:
                gpu.call = family[0]
            raise self._nvml.NVMLError_FunctionNotFound()
        for i, name in enumerate(names):
            try:
                result = self._call(gpu, name, *args) if gpu is not None else getattr(self._nvml, name)(*args)
            except NVML_ERRORS as exc:
                if not is_function_not_found(exc):
                    self._chosen[family] = name
                elif i + 1 < len(names):
                    log_function_not_found(name)
                    continue
                raise
            self._chosen[family] = name
            return result
        raise AssertionError("unreachable: the loop returns or raises")

    def _utilization(self, gpu: _Gpu) -> Values:
        rates = self._call(gpu, "nvmlDeviceGetUtilizationRates")
        return {"gpu_util_pct": int(rates.gpu), "mem_util_pct": int(rates.memory)}

    def _memory(self, gpu: _Gpu) -> Values:
        mem = self._call(gpu, "nvmlDeviceGetMemoryInfo")
        return {"memory_used_bytes": int(mem.used), "memory_total_bytes": int(mem.total)}

    def _temperature(self, gpu: _Gpu) -> Values:
        return {"temperature_c": int(self._call(gpu, "nvmlDeviceGetTemperature", self._nvml.NVML_TEMPERATURE_GPU))}

    def _power(self, gpu: _Gpu) -> Values:
        return {"power_w": self._call(gpu, "nvmlDeviceGetPowerUsage") / 1000.0}  # mW

    def _power_limit(self, gpu: _Gpu) -> Values:
        return {"power_limit_w": self._call(gpu, "nvmlDeviceGetEnforcedPowerLimit") / 1000.0}  # mW

    def _sm_clock(self, gpu: _Gpu) -> Values:
        return {"sm_clock_mhz": int(self._call(gpu, "nvmlDeviceGetClockInfo", self._nvml.NVML_CLOCK_SM))}

    def _clock_events(self, gpu: _Gpu) -> Values:
        bits = int(self._versioned(gpu, CLOCK_EVENT_FNS))
        return {
            "clock_event_reasons": bits,
            "hw_slowdown": bool(bits & (HW_SLOWDOWN | HW_THERMAL_SLOWDOWN | HW_POWER_BRAKE_SLOWDOWN)),
            "thermal_slowdown": bool(bits & (SW_THERMAL_SLOWDOWN | HW_THERMAL_SLOWDOWN)),
            "power_brake": bool(bits & HW_POWER_BRAKE_SLOWDOWN),
        }

    def _ecc_mode(self, gpu: _Gpu) -> Values:
        current, _pending = self._call(gpu, "nvmlDeviceGetEccMode")
        return {"ecc_enabled": current == self._nvml.NVML_FEATURE_ENABLED}

    def _ecc_counts(self, gpu: _Gpu, counter: int, prefix: str) -> Values:
        n = self._nvml
        corrected = self._call(gpu, "nvmlDeviceGetTotalEccErrors", n.NVML_MEMORY_ERROR_TYPE_CORRECTED, counter)
        uncorrected = self._call(gpu, "nvmlDeviceGetTotalEccErrors", n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, counter)
        return {f"ecc_{prefix}_corrected": int(corrected), f"ecc_{prefix}_uncorrected": int(uncorrected)}

    def _retired_pages(self, gpu: _Gpu) -> Values:
        n = self._nvml
        sbe = self._call(gpu, "nvmlDeviceGetRetiredPages", n.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS)
        dbe = self._call(gpu, "nvmlDeviceGetRetiredPages", n.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR)
        return {"retired_pages_sbe": len(sbe), "retired_pages_dbe": len(dbe)}

    def _retired_pages_pending(self, gpu: _Gpu) -> Values:
        pending = self._call(gpu, "nvmlDeviceGetRetiredPagesPendingStatus")
        return {"retired_pages_pending": pending == self._nvml.NVML_FEATURE_ENABLED}

    def _remapped_rows(self, gpu: _Gpu) -> Values:
        corr, unc, pending, failure = self._call(gpu, "nvmlDeviceGetRemappedRows")
        return {
            "remap_correctable": int(corr),
            "remap_uncorrectable": int(unc),
            "remap_pending": bool(pending),
            "remap_failure": bool(failure),
        }

    def _pcie_replay(self, gpu: _Gpu) -> Values:
        return {"pcie_replay_counter": int(self._call(gpu, "nvmlDeviceGetPcieReplayCounter"))}

    def _nvlink(self, gpu: _Gpu) -> Values | None:
        """Error counters summed over the active links; None without NVLink."""
        if gpu.nvlinks is None:
            gpu.nvlinks = self._probe_links(gpu)
        if not gpu.nvlinks:
            return None
        n = self._nvml
        counters = (
            ("nvlink_crc_errors", n.NVML_NVLINK_ERROR_DL_CRC_FLIT),
            ("nvlink_replay_errors", n.NVML_NVLINK_ERROR_DL_REPLAY),
            ("nvlink_recovery_errors", n.NVML_NVLINK_ERROR_DL_RECOVERY),
        )
        totals = dict.fromkeys((key for key, _ in counters), 0)
        for link in gpu.nvlinks:
            if self._call(gpu, "nvmlDeviceGetNvLinkState", link) != n.NVML_FEATURE_ENABLED:
                continue
            for key, counter in counters:
                totals[key] += int(self._call(gpu, "nvmlDeviceGetNvLinkErrorCounter", link, counter))
        return totals

    def _probe_links(self, gpu: _Gpu) -> list[int]:
        links = []
        for link in range(self._nvml.NVML_NVLINK_MAX_LINKS):
            try:
                self._call(gpu, "nvmlDeviceGetNvLinkState", link)
            except NVML_ERRORS as exc:
                if isinstance(classify(exc, gpu.call), NvmlFinding) and not is_invalid_argument(exc):
                    raise
                continue  # no such link on this GPU
            links.append(link)
        return links

    def _recovery_action(self, gpu: _Gpu) -> Values | None:
        """NVML_FI_DEV_GET_GPU_RECOVERY_ACTION; None on bindings/drivers before 570."""
        if self._recovery_field is None:
            return None
        value = self._call(gpu, "nvmlDeviceGetFieldValues", [self._recovery_field])[0]
        n = self._nvml
        if value.nvmlReturn in (n.NVML_ERROR_NOT_SUPPORTED, n.NVML_ERROR_INVALID_ARGUMENT):
            return None  # a driver that does not know the field
        if value.nvmlReturn != n.NVML_SUCCESS:
            raise n.NVMLError(value.nvmlReturn)
        return {"recovery_action": int(getattr(value.value, _VALUE_MEMBER.get(value.valueType, "uiVal")))}

    def _processes(self, gpu: _Gpu) -> Values:
        procs = self._versioned(gpu, PROCESS_FNS)
        return {"processes": tuple(GpuProcess(int(p.pid), _memory_or_none(p.usedGpuMemory)) for p in procs)}

    # --- events ------------------------------------------------------------
    def registered_events(self) -> dict[str, list[str]]:
        """Per GPU UUID, the event types NVML accepted ("xid", "ecc_dbe", "ecc_sbe")."""
        with self._events_lock:
            return {uuid: list(kinds) for uuid, kinds in self._registered.items()}

    def wait_events(self, timeout_s: float) -> list[NvmlEvent]:
        """Block up to timeout_s (by design: the daemon calls this on its own thread)."""
        self._require_open()
        end = time.monotonic() + timeout_s
        while (left := end - time.monotonic()) > 0 and not self._closing.is_set():
            with self._events_lock:
                if self._closing.is_set():
                    break
                if not self._events_ready:
                    self._register_events()
                if self._event_set is None:
                    break
                data = self._wait_one(min(left, EVENT_SLICE_S))
                if data is not None:
                    return self._drain(data)
        if self._event_set is None:
            self._closing.wait(max(0.0, end - time.monotonic()))
        return []

    def _register_events(self) -> None:
        n = self._nvml
        kinds = _event_kinds(n)
        self._events_ready = True
        try:
            event_set = n.nvmlEventSetCreate()
        except NVML_ERRORS as exc:
            log.warning("nvml_events_unavailable", call="nvmlEventSetCreate", error=str(exc))
            return
        for gpu in self._gpus:
            if gpu.handle is None:
                continue
            accepted = []
            try:
                supported = int(n.nvmlDeviceGetSupportedEventTypes(gpu.handle))
                for bit, kind in kinds.items():
                    if supported & bit:
                        try:
                            n.nvmlDeviceRegisterEvents(gpu.handle, bit, event_set)
                        except NVML_ERRORS as exc:
                            log.warning("nvml_event_not_registered", gpu_uuid=gpu.info.uuid, type=kind, error=str(exc))
                        else:
                            accepted.append(kind)
            except NVML_ERRORS as exc:
                log.warning("nvml_events_not_registered", gpu_uuid=gpu.info.uuid, error=str(exc))
            self._registered[gpu.info.uuid] = accepted
            self._uuid_by_handle[_address(gpu.handle)] = gpu.info.uuid
        if any(self._registered.values()):
            self._event_set = event_set
            log.info("nvml_events_registered", gpus=self._registered)
        else:
            n.nvmlEventSetFree(event_set)
            log.info("nvml_events_unavailable", reason="no GPU accepts Xid or ECC events")

    def _wait_one(self, timeout_s: float) -> Any:
        """One event's data, or None when none came within timeout_s."""
        try:
            return self._versioned(None, EVENT_WAIT_FNS, self._event_set, int(timeout_s * 1000))
        except NVML_ERRORS as exc:
            if is_timeout(exc):
                return None
            raise

    def _drain(self, first: Any) -> list[NvmlEvent]:
        """The event that woke us and those already queued behind it."""
        events = [self._event(first)]
        while len(events) < EVENT_DRAIN_MAX and (data := self._wait_one(0)) is not None:
            events.append(self._event(data))
        return events

    def _event(self, data: Any) -> NvmlEvent:
        event_type = int(data.eventType)
        uuid = self._uuid_by_handle.get(_address(data.device), "")
        kind = _event_kinds(self._nvml).get(event_type, f"0x{event_type:x}")
        return NvmlEvent(uuid, kind, int(data.eventData), time.time())

    def _free_event_set(self) -> None:
        if self._event_set is None:
            return
        try:
            self._nvml.nvmlEventSetFree(self._event_set)
        except NVML_ERRORS as exc:
            log.warning("nvml_event_set_free_failed", error=str(exc))
        self._event_set = None


def _event_kinds(nvml: Any) -> dict[int, str]:
    """The nvmlEventType bits the daemon registers, by their NvmlEvent name."""
    return {
        nvml.nvmlEventTypeXidCriticalError: "xid",
        nvml.nvmlEventTypeDoubleBitEccError: "ecc_dbe",
        nvml.nvmlEventTypeSingleBitEccError: "ecc_sbe",
    }


def _text(value: str | bytes) -> str:
    """Older bindings hand back bytes where newer ones decode."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _cuda_version(value: int) -> str:
    """12040 -> "12.4" (nvmlSystemGetCudaDriverVersion's encoding)."""
    return f"{value // 1000}.{value % 1000 // 10}"


def _memory_or_none(value: int | None) -> int | None:
    return None if value is None or value == NOT_AVAILABLE_ULL else int(value)


def _address(handle: Any) -> int | None:
    """A device handle's pointer value, the same for every copy of the handle."""
    return ctypes.cast(handle, ctypes.c_void_p).value
