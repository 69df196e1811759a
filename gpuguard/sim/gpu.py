"""One simulated GPU: its fault and counter state, and the metrics a poll reads from it.

Plain state, not thread-safe: the backend holds its lock around every call.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from gpuguard.nvml.types import GpuInfo, GpuSnapshot
from gpuguard.sim.faults import THERMAL_SLOWDOWN_C, XID_DBE, XID_FALLEN_OFF_BUS, Fault
from gpuguard.sim.processes import ProcessSample, ProcessTracker

POWER_LIMIT_W = 700.0
BASE_MEMORY_BYTES = 600 * 1024**2  # what the driver reserves on an idle H100
SM_CLOCK_BUSY_MHZ = 1980
SM_CLOCK_IDLE_MHZ = 345
SM_CLOCK_THROTTLED_MHZ = 1290
# nvmlClocksEventReasons bits
REASON_GPU_IDLE = 0x1
REASON_SW_THERMAL = 0x20
REASON_HW_THERMAL = 0x40
HW_THERMAL_C = 95


class GpuIsLost(RuntimeError):
    """What NVML raises for every call on a GPU that has fallen off the bus."""

    def __init__(self, call: str, reason: str) -> None:
        super().__init__(f"{call}: GPU is lost ({reason})")
        self.call = call
        self.reason = reason


@dataclass(slots=True)
class HardwareState:
    """What faults and wear have done to the board."""

    lost_reason: str | None = None
    hang: bool = False
    thermal_c: int | None = None
    nvml_hang_until: float = 0.0  # time.monotonic() until which reads block
    remap_pending: bool = False
    remap_correctable: int = 0
    remap_uncorrectable: int = 0
    ecc_volatile_corrected: int = 0
    ecc_volatile_uncorrected: int = 0
    ecc_aggregate_corrected: int = 0
    ecc_aggregate_uncorrected: int = 0


class SimGpu:
    def __init__(self, info: GpuInfo) -> None:
        self.info = info
        self.processes = ProcessTracker()
        self.state = HardwareState()
        self.resets = 0
        self._temperature_c = 31.0 + info.index % 4
        self._power_w = 68.0

    def apply(self, fault: Fault) -> str:
        """Change the board as the fault would; returns what happened, in a few words."""
        s = self.state
        match fault.name:
            case "xid":
                code = int(fault.amount or 0)
                if code == XID_FALLEN_OFF_BUS:
                    s.lost_reason = "fallen off the bus, Xid 79"
                    return "Xid 79 logged; the GPU has fallen off the bus"
                if code == XID_DBE:
                    self._add_dbe()
                    return "Xid 48 logged; uncorrected ECC +1"
                return f"Xid {code} logged"
            case "ecc-dbe":
                self._add_dbe()
                return "double-bit ECC error: uncorrected ECC +1, Xid 48 logged"
            case "ecc-sbe":
                count = int(fault.amount or 0)
                s.ecc_volatile_corrected += count
                s.ecc_aggregate_corrected += count
                return f"corrected ECC +{count}"
            case "hang":
                s.hang = True
                return "GPU hung: utilisation stays at 0"
            case "lost":
                s.lost_reason = "injected fault"
                return "GPU lost: every NVML call fails with GPU_IS_LOST"
            case "remap-pending":
                s.remap_pending = True
                return "row remap pending: a reset is due"
            case "thermal":
                s.thermal_c = int(fault.amount or 0)
                slow = " with thermal slowdown" if s.thermal_c >= THERMAL_SLOWDOWN_C else ""
                return f"temperature held at {s.thermal_c} C{slow}"
            case "nvml-hang":
                seconds = float(fault.amount or 0)
                s.nvml_hang_until = time.monotonic() + seconds
                return f"NVML calls on this GPU block for {seconds:g}s"
            case "clear":
                self.state = HardwareState()
                return "every injected fault cleared"
        raise AssertionError(f"parse_fault let through {fault.name!r}")

    def _add_dbe(self) -> None:
        self.state.ecc_volatile_uncorrected += 1
        self.state.ecc_aggregate_uncorrected += 1

    def reset(self, busy_pid: int | None) -> tuple[bool, str]:
        """What `nvidia-smi --gpu-reset` does to the board; busy_pid is a process still on it."""
        s = self.state
        if s.lost_reason is not None:
            reason = f"GPU {self.info.index} is lost ({s.lost_reason}): a reset cannot bring it back; reboot the node"
            return False, reason
        if busy_pid is not None:
            return False, f"GPU {self.info.index} is in use by process {busy_pid}; stop it before a reset"
        done = ["volatile ECC counters cleared"]
        if s.remap_pending:
            s.remap_uncorrectable += 1
            done.append("pending row remap applied")
        if s.hang:
            done.append("hang cleared")
        if s.thermal_c is not None:
            done.append("temperature back to normal")
        s.remap_pending = s.hang = False
        s.thermal_c = None
        s.nvml_hang_until = 0.0
        s.ecc_volatile_corrected = s.ecc_volatile_uncorrected = 0
        self.resets += 1
        return True, f"GPU {self.info.index} reset (simulated, reset #{self.resets}): {', '.join(done)}"

    def read(self, sample: ProcessSample, now: float) -> GpuSnapshot:
        """One poll's metrics; raises GpuIsLost like every NVML call on a lost GPU."""
        s = self.state
        if s.lost_reason is not None:
            raise GpuIsLost("nvmlDeviceGetUtilizationRates", s.lost_reason)
        util = 0 if s.hang else round(sample.busy_pct)
        wave = math.sin(now / 40.0 + self.info.index)
        if s.thermal_c is not None:
            self._temperature_c = float(s.thermal_c)
        else:  # heats and cools gradually toward what the load asks for
            self._temperature_c += (31.0 + 0.42 * util + 1.5 * wave - self._temperature_c) * 0.3
        self._power_w += (68.0 + 5.9 * util + 4.0 * wave - self._power_w) * 0.5
        temperature = round(self._temperature_c)
        reasons = REASON_GPU_IDLE if util == 0 else 0
        if temperature >= THERMAL_SLOWDOWN_C:
            reasons |= REASON_SW_THERMAL
        if temperature >= HW_THERMAL_C:
            reasons |= REASON_HW_THERMAL
        thermal = bool(reasons & (REASON_SW_THERMAL | REASON_HW_THERMAL))
        clock = SM_CLOCK_IDLE_MHZ if util == 0 else SM_CLOCK_THROTTLED_MHZ if thermal else SM_CLOCK_BUSY_MHZ
        total = self.info.memory_total_bytes or 0
        used = BASE_MEMORY_BYTES + sum(p.used_memory_bytes or 0 for p in sample.processes)
        return GpuSnapshot(
            index=self.info.index,
            uuid=self.info.uuid,
            timestamp=time.time(),
            gpu_util_pct=util,
            mem_util_pct=round(util * 0.55),
            memory_used_bytes=min(used, total),
            memory_total_bytes=total,
            temperature_c=temperature,
            power_w=round(min(self._power_w, POWER_LIMIT_W), 1),
            power_limit_w=POWER_LIMIT_W,
            sm_clock_mhz=clock,
            clock_event_reasons=reasons,
            hw_slowdown=False,
            thermal_slowdown=thermal,
            power_brake=False,
            ecc_enabled=True,
            ecc_volatile_corrected=s.ecc_volatile_corrected,
            ecc_volatile_uncorrected=s.ecc_volatile_uncorrected,
            ecc_aggregate_corrected=s.ecc_aggregate_corrected,
            ecc_aggregate_uncorrected=s.ecc_aggregate_uncorrected,
            retired_pages_sbe=0,
            retired_pages_dbe=0,
            retired_pages_pending=False,
            remap_correctable=s.remap_correctable,
            remap_uncorrectable=s.remap_uncorrectable,
            remap_pending=s.remap_pending,
            remap_failure=False,
            pcie_replay_counter=0,
            nvlink_crc_errors=0,
            nvlink_replay_errors=0,
            nvlink_recovery_errors=0,
            recovery_action=0,
            processes=sample.processes,
        )
