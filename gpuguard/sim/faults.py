"""The faults `gpuguardctl inject` can put on a simulated GPU, and how their values parse.

Parsing is kept apart from the GPU model so every bad input is refused with
one clear message before anything changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Xid -> the text the driver prints after `pid=..., name=...,`; drawn from
# NVIDIA's Xid catalog and real kernel logs. Other codes get a generic text.
XID_TEXT: dict[int, str] = {
    13: "Graphics Exception: ESR 0x405840=0x3000000 0x405844=0x0 0x405848=0x0 0x40584c=0x0",
    31: "Ch 00000008, intr 00000000. MMU Fault: ENGINE GRAPHICS GPCCLIENT_T1_0 faulted @ 0x7f2a_4e000000. "
    "Fault is of type FAULT_PDE ACCESS_TYPE_VIRT_READ",
    43: "Ch 00000008",
    45: "Ch 00000008, errorString CTX SWITCH TIMEOUT, Info 0x1c010",
    48: "An uncorrectable double bit error (DBE) has been detected on GPU in the framebuffer at partition 6, "
    "subpartition 0.",
    62: "Internal micro-controller halt (non-fatal)",
    63: "Row Remapper: New row marked for remapping, reset gpu to activate.",
    64: "Row Remapper: Failed to mark a row for remapping.",
    74: "NVLink: fatal error detected on link 4(0x0, 0x0, 0x10000, 0x0, 0x0, 0x0, 0x0)",
    79: "GPU has fallen off the bus.",
    92: "High single-bit ECC error rate",
    94: "Contained: SM (0x1). RST: No, D-RST: No",
    95: "Uncontained: FBHUB. RST: Yes, D-RST: No",
    109: "Ch 00000010, errorString CTX SWITCH TIMEOUT, Info 0x2c014",
    119: "Timeout after 6s of waiting for RPC response from GPU0 GSP! Expected function 76 (GSP_RM_CONTROL) "
    "(0x20800a4c 0x4).",
    120: "GSP task exception: Reason: Crash.",
    154: "GPU recovery action changed from 0x0 (None) to 0x1 (GPU Reset Required)",
}

# real drivers were seen not to deliver these as NVML events: only the kernel log has them
XID_WITHOUT_NVML_EVENT = frozenset({79, 119, 120})
XID_FALLEN_OFF_BUS = 79
XID_DBE = 48
THERMAL_SLOWDOWN_C = 90
NVML_HANG_DEFAULT_S = 30.0
PID_MAX = 4_194_304  # the largest pid Linux hands out (kernel.pid_max's ceiling)
# not faults: they make NVML list (or stop listing) a process on the GPU, as if
# it had opened a CUDA context there, such as a process gpuguard did not start
PROCESS_CONTROLS = ("attach", "detach")

USAGE = (
    "xid CODE, ecc-dbe, ecc-sbe COUNT, hang, lost, remap-pending, thermal CELSIUS, "
    "nvml-hang [SECONDS] (default 30), clear, attach PID, detach PID"
)


@dataclass(frozen=True, slots=True)
class Fault:
    """A parsed, valid fault: `amount` is the Xid code, count, Celsius or seconds."""

    name: str
    amount: float | None = None


def xid_text(code: int) -> str:
    return XID_TEXT.get(code, f"Xid {code} reported by the GPU (simulated).")


def parse_fault(name: str, value: str | None) -> Fault:
    """Validate one inject request; ValueError names the fault and what is wrong."""
    name = name.strip().lower()
    value = value.strip() if value is not None else None
    if name in ("ecc-dbe", "hang", "lost", "remap-pending", "clear"):
        if value:
            raise ValueError(f"fault {name!r} takes no value (got {value!r})")
        return Fault(name)
    if name == "xid":
        return Fault(name, _integer(name, "CODE", value, 1, 999))
    if name == "ecc-sbe":
        return Fault(name, _integer(name, "COUNT", value, 1, 1_000_000))
    if name == "thermal":
        return Fault(name, _integer(name, "CELSIUS", value, 0, 150))
    if name in PROCESS_CONTROLS:
        return Fault(name, _integer(name, "PID", value, 1, PID_MAX))
    if name == "nvml-hang":
        if not value:
            return Fault(name, NVML_HANG_DEFAULT_S)
        try:
            seconds = float(value)
        except ValueError:
            seconds = math.nan
        if not 0 < seconds <= 3600:
            raise ValueError(f"nvml-hang needs SECONDS between 0 and 3600 (got {value!r})")
        return Fault(name, seconds)
    raise ValueError(f"unknown fault {name!r}; known faults: {USAGE}")


def _integer(fault: str, what: str, value: str | None, low: int, high: int) -> int:
    if not value:
        raise ValueError(f"{fault} needs {what}, an integer from {low} to {high}")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{fault} {what} must be an integer from {low} to {high} (got {value!r})") from None
    if not low <= number <= high:
        raise ValueError(f"{fault} {what} must be from {low} to {high} (got {number})")
    return number
