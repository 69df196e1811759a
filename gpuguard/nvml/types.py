"""Plain, frozen data that crosses the NVML boundary.

A value NVML cannot give (not supported, no such function on this driver) is
`None`. Errors that say something about the GPU's health (lost, reset
required, an unknown error, a call past its deadline) are never folded into
`None`: they travel as `NvmlFinding`s beside the values.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FindingKind(enum.StrEnum):
    """NVML outcomes that are health facts, not missing values."""

    GPU_LOST = "gpu_lost"  # NVML_ERROR_GPU_IS_LOST
    RESET_REQUIRED = "reset_required"  # NVML_ERROR_RESET_REQUIRED
    NVML_ERROR = "nvml_error"  # NVML_ERROR_UNKNOWN and other unexpected errors
    DEADLINE = "deadline"  # an NVML call did not return before its deadline


@dataclass(frozen=True, slots=True)
class NvmlFinding:
    kind: FindingKind
    call: str  # the NVML function (or "poll") that produced it
    detail: str = ""


@dataclass(frozen=True, slots=True)
class DriverInfo:
    driver_version: str | None
    cuda_driver_version: str | None  # "12.4" form
    nvml_version: str | None


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """What does not change while the GPU is attached."""

    index: int
    uuid: str  # "GPU-xxxxxxxx-...."
    pci_bus_id: str  # "00000000:3B:00.0" as NVML spells it
    name: str
    serial: str | None
    memory_total_bytes: int | None


@dataclass(frozen=True, slots=True)
class GpuProcess:
    pid: int
    used_memory_bytes: int | None


@dataclass(frozen=True, slots=True)
class GpuSnapshot:
    """One GPU at one poll. Every metric may be None (not available)."""

    index: int
    uuid: str
    timestamp: float  # time.time() when the poll finished
    findings: tuple[NvmlFinding, ...] = ()

    gpu_util_pct: int | None = None
    mem_util_pct: int | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    sm_clock_mhz: int | None = None
    # nvmlClocksEventReasons bitmask and the three reasons health cares about
    clock_event_reasons: int | None = None
    hw_slowdown: bool | None = None
    thermal_slowdown: bool | None = None  # SW or HW thermal slowdown
    power_brake: bool | None = None

    ecc_enabled: bool | None = None
    ecc_volatile_corrected: int | None = None
    ecc_volatile_uncorrected: int | None = None
    ecc_aggregate_corrected: int | None = None
    ecc_aggregate_uncorrected: int | None = None

    retired_pages_sbe: int | None = None
    retired_pages_dbe: int | None = None
    retired_pages_pending: bool | None = None

    remap_correctable: int | None = None
    remap_uncorrectable: int | None = None
    remap_pending: bool | None = None
    remap_failure: bool | None = None

    pcie_replay_counter: int | None = None
    # summed over the GPU's links; None where the GPU has no NVLink
    nvlink_crc_errors: int | None = None
    nvlink_replay_errors: int | None = None
    nvlink_recovery_errors: int | None = None

    # NVML_FI_DEV_GET_GPU_RECOVERY_ACTION (driver 570+): 0 none, 1 reset,
    # 2 reboot, 3 drain P2P, 4 drain and reset
    recovery_action: int | None = None

    processes: tuple[GpuProcess, ...] = field(default_factory=tuple)

    def has(self, kind: FindingKind) -> bool:
        return any(f.kind == kind for f in self.findings)


@dataclass(frozen=True, slots=True)
class NvmlEvent:
    """One event from nvmlEventSetWait (critical Xid, double-bit ECC, ...)."""

    uuid: str
    event_type: str  # "xid", "ecc_dbe", "ecc_sbe", "pstate", "clock", "power", ...
    data: int  # the Xid code for "xid" events
    timestamp: float
