"""One poll of one GPU: its many NVML reads, on its lane, into a GpuSnapshot.

The reads are a table, each a small function of the door and the GPU. A read
NVML cannot give is not asked again on that GPU; a health error (lost, reset
required, unknown, deadline) becomes a finding beside the values that came.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from gpuguard.nvml.deadline import DeadlineExceeded
from gpuguard.nvml.door import Gpu, NvmlDoor
from gpuguard.nvml.errors import NVML_ERRORS, is_invalid_argument
from gpuguard.nvml.types import FindingKind, GpuProcess, GpuSnapshot, NvmlFinding

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

# c_nvmlValue_t member by nvmlValueType_t
_VALUE_MEMBER = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}

Values = dict[str, Any]
Read = Callable[[Gpu], Values | None]  # None: this GPU does not have it


class SnapshotReader:
    """The reads of one poll, all through the door."""

    def __init__(self, door: NvmlDoor) -> None:
        self._door = door
        self._reads: tuple[tuple[str, Read], ...] = (
            ("utilization", self._utilization),
            ("memory", self._memory),
            ("temperature", self._temperature),
            ("power", self._power),
            ("power_limit", self._power_limit),
            ("sm_clock", self._sm_clock),
            ("clock_events", self._clock_events),
            ("ecc_mode", self._ecc_mode),
            ("ecc_volatile", partial(self._ecc_counts, counter="NVML_VOLATILE_ECC", prefix="volatile")),
            ("ecc_aggregate", partial(self._ecc_counts, counter="NVML_AGGREGATE_ECC", prefix="aggregate")),
            ("retired_pages", self._retired_pages),
            ("retired_pages_pending", self._retired_pages_pending),
            ("remapped_rows", self._remapped_rows),
            ("pcie_replay", self._pcie_replay),
            ("nvlink", self._nvlink),
            ("recovery_action", self._recovery_action),
            ("processes", self._processes),
        )

    def read(self, gpu: Gpu) -> tuple[Values, list[NvmlFinding]]:
        """All reads of one GPU, on its lane. A lost GPU stops at the first call."""
        values: Values = {}
        findings: list[NvmlFinding] = []
        for name, read in self._reads:
            if name in gpu.unsupported:
                continue
            try:
                got = read(gpu)
            except NVML_ERRORS as exc:
                outcome = self._door.failure(exc, gpu)
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

    def snapshot(self, gpu: Gpu, result: Any, now: float) -> GpuSnapshot:
        """The snapshot from read()'s result on the lane (or the lane's exception)."""
        index, uuid = gpu.info.index, gpu.info.uuid
        if gpu.lost is not None:
            return GpuSnapshot(index, uuid, now, findings=(gpu.lost,))
        if isinstance(result, DeadlineExceeded):
            # gpu.call is the NVML function the lane is stuck in
            return GpuSnapshot(index, uuid, now, findings=(self._door.failure(result, gpu),))
        if isinstance(result, BaseException):
            raise result
        values, findings = result
        return GpuSnapshot(index, uuid, now, findings=tuple(findings), **values)

    # --- the reads -------------------------------------------------------------
    def _utilization(self, gpu: Gpu) -> Values:
        rates = self._door.call("nvmlDeviceGetUtilizationRates", gpu=gpu)
        return {"gpu_util_pct": int(rates.gpu), "mem_util_pct": int(rates.memory)}

    def _memory(self, gpu: Gpu) -> Values:
        mem = self._door.call("nvmlDeviceGetMemoryInfo", gpu=gpu)
        return {"memory_used_bytes": int(mem.used), "memory_total_bytes": int(mem.total)}

    def _temperature(self, gpu: Gpu) -> Values:
        sensor = self._door.constant("NVML_TEMPERATURE_GPU")
        return {"temperature_c": int(self._door.call("nvmlDeviceGetTemperature", sensor, gpu=gpu))}

    def _power(self, gpu: Gpu) -> Values:
        return {"power_w": self._door.call("nvmlDeviceGetPowerUsage", gpu=gpu) / 1000.0}  # mW

    def _power_limit(self, gpu: Gpu) -> Values:
        return {"power_limit_w": self._door.call("nvmlDeviceGetEnforcedPowerLimit", gpu=gpu) / 1000.0}  # mW

    def _sm_clock(self, gpu: Gpu) -> Values:
        clock = self._door.constant("NVML_CLOCK_SM")
        return {"sm_clock_mhz": int(self._door.call("nvmlDeviceGetClockInfo", clock, gpu=gpu))}

    def _clock_events(self, gpu: Gpu) -> Values:
        bits = int(self._door.call(CLOCK_EVENT_FNS, gpu=gpu))
        return {
            "clock_event_reasons": bits,
            "hw_slowdown": bool(bits & (HW_SLOWDOWN | HW_THERMAL_SLOWDOWN | HW_POWER_BRAKE_SLOWDOWN)),
            "thermal_slowdown": bool(bits & (SW_THERMAL_SLOWDOWN | HW_THERMAL_SLOWDOWN)),
            "power_brake": bool(bits & HW_POWER_BRAKE_SLOWDOWN),
        }

    def _ecc_mode(self, gpu: Gpu) -> Values:
        current, _pending = self._door.call("nvmlDeviceGetEccMode", gpu=gpu)
        return {"ecc_enabled": current == self._door.constant("NVML_FEATURE_ENABLED")}

    def _ecc_counts(self, gpu: Gpu, counter: str, prefix: str) -> Values:
        """`counter`: the name of the nvmlEccCounterType_t constant (volatile or aggregate)."""
        door = self._door
        counter_type = door.constant(counter)
        corrected_type = door.constant("NVML_MEMORY_ERROR_TYPE_CORRECTED")
        uncorrected_type = door.constant("NVML_MEMORY_ERROR_TYPE_UNCORRECTED")
        corrected = door.call("nvmlDeviceGetTotalEccErrors", corrected_type, counter_type, gpu=gpu)
        uncorrected = door.call("nvmlDeviceGetTotalEccErrors", uncorrected_type, counter_type, gpu=gpu)
        return {f"ecc_{prefix}_corrected": int(corrected), f"ecc_{prefix}_uncorrected": int(uncorrected)}

    def _retired_pages(self, gpu: Gpu) -> Values:
        door = self._door
        sbe = door.constant("NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS")
        dbe = door.constant("NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR")
        return {
            "retired_pages_sbe": len(door.call("nvmlDeviceGetRetiredPages", sbe, gpu=gpu)),
            "retired_pages_dbe": len(door.call("nvmlDeviceGetRetiredPages", dbe, gpu=gpu)),
        }

    def _retired_pages_pending(self, gpu: Gpu) -> Values:
        pending = self._door.call("nvmlDeviceGetRetiredPagesPendingStatus", gpu=gpu)
        return {"retired_pages_pending": pending == self._door.constant("NVML_FEATURE_ENABLED")}

    def _remapped_rows(self, gpu: Gpu) -> Values:
        corr, unc, pending, failure = self._door.call("nvmlDeviceGetRemappedRows", gpu=gpu)
        return {
            "remap_correctable": int(corr),
            "remap_uncorrectable": int(unc),
            "remap_pending": bool(pending),
            "remap_failure": bool(failure),
        }

    def _pcie_replay(self, gpu: Gpu) -> Values:
        return {"pcie_replay_counter": int(self._door.call("nvmlDeviceGetPcieReplayCounter", gpu=gpu))}

    def _nvlink(self, gpu: Gpu) -> Values | None:
        """Error counters summed over the active links; None without NVLink."""
        if gpu.nvlinks is None:
            gpu.nvlinks = self._probe_links(gpu)
        if not gpu.nvlinks:
            return None
        door = self._door
        counters = (
            ("nvlink_crc_errors", door.constant("NVML_NVLINK_ERROR_DL_CRC_FLIT")),
            ("nvlink_replay_errors", door.constant("NVML_NVLINK_ERROR_DL_REPLAY")),
            ("nvlink_recovery_errors", door.constant("NVML_NVLINK_ERROR_DL_RECOVERY")),
        )
        totals = dict.fromkeys((key for key, _ in counters), 0)
        for link in gpu.nvlinks:
            if door.call("nvmlDeviceGetNvLinkState", link, gpu=gpu) != door.constant("NVML_FEATURE_ENABLED"):
                continue
            for key, counter in counters:
                totals[key] += int(door.call("nvmlDeviceGetNvLinkErrorCounter", link, counter, gpu=gpu))
        return totals

    def _probe_links(self, gpu: Gpu) -> list[int]:
        links = []
        for link in range(self._door.constant("NVML_NVLINK_MAX_LINKS")):
            try:
                self._door.call("nvmlDeviceGetNvLinkState", link, gpu=gpu)
            except NVML_ERRORS as exc:
                if isinstance(self._door.failure(exc, gpu), NvmlFinding) and not is_invalid_argument(exc):
                    raise
                continue  # no such link on this GPU
            links.append(link)
        return links

    def _recovery_action(self, gpu: Gpu) -> Values | None:
        """NVML_FI_DEV_GET_GPU_RECOVERY_ACTION; None on bindings/drivers before 570."""
        door = self._door
        recovery_field = door.constant("NVML_FI_DEV_GET_GPU_RECOVERY_ACTION", optional=True)
        if recovery_field is None:
            return None
        value = door.call("nvmlDeviceGetFieldValues", [recovery_field], gpu=gpu)[0]
        unknown_field = door.constant("NVML_ERROR_NOT_SUPPORTED"), door.constant("NVML_ERROR_INVALID_ARGUMENT")
        if value.nvmlReturn in unknown_field:
            return None  # a driver that does not know the field
        if value.nvmlReturn != door.constant("NVML_SUCCESS"):
            raise door.error(value.nvmlReturn)
        return {"recovery_action": int(getattr(value.value, _VALUE_MEMBER.get(value.valueType, "uiVal")))}

    def _processes(self, gpu: Gpu) -> Values:
        procs = self._door.call(PROCESS_FNS, gpu=gpu)
        return {"processes": tuple(GpuProcess(int(p.pid), _memory_or_none(p.usedGpuMemory)) for p in procs)}


def _memory_or_none(value: int | None) -> int | None:
    return None if value is None or value == NOT_AVAILABLE_ULL else int(value)
