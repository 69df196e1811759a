"""NVML errors, classified once and in one place.

An NVML error either means "this value is not there" (`NotAvailable`, shown
as None) or says something about the GPU's health (`NvmlFinding`). Unlike
nvitop's N/A, a lost GPU, a required reset, an unknown error or a call past
its deadline is never folded into "not available".
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pynvml  # the binding only; it loads libnvidia-ml at nvmlInit, not on import
import structlog

from gpuguard.nvml.deadline import DeadlineExceeded
from gpuguard.nvml.types import FindingKind, NvmlFinding

log = structlog.get_logger(__name__)

# raised by the binding's unversioned wrappers when the driver lacks the
# function they call (nvidia-ml-py 12.560+); absent from older bindings
_LIBRARY_MISMATCH: tuple[type[BaseException], ...] = tuple(
    cls for cls in (getattr(pynvml, "NVMLLibraryMismatchError", None),) if cls is not None
)

# error class -> (reason, permanent): permanent ones are not asked again
_NOT_AVAILABLE: dict[type[pynvml.NVMLError], tuple[str, bool]] = {
    pynvml.NVMLError_NotSupported: ("not_supported", True),
    pynvml.NVMLError_FunctionNotFound: ("function_not_found", True),
    pynvml.NVMLError_NoPermission: ("no_permission", True),
    pynvml.NVMLError_NoData: ("no_data", False),
    pynvml.NVMLError_NotFound: ("not_found", False),
}

_FINDINGS: dict[type[pynvml.NVMLError], FindingKind] = {
    pynvml.NVMLError_GpuIsLost: FindingKind.GPU_LOST,
    pynvml.NVMLError_ResetRequired: FindingKind.RESET_REQUIRED,
}

# open() turns these into BackendUnavailable: there is no usable NVML at all
UNAVAILABLE_REASONS: dict[type[pynvml.NVMLError], str] = {
    pynvml.NVMLError_LibraryNotFound: (
        "the NVML library libnvidia-ml.so.1 was not found (is the NVIDIA driver installed?)"
    ),
    pynvml.NVMLError_DriverNotLoaded: "the NVIDIA kernel driver is not loaded",
    pynvml.NVMLError_LibRmVersionMismatch: (
        "the NVML library and the loaded kernel driver differ in version (driver updated without a reboot?)"
    ),
    pynvml.NVMLError_NoPermission: "no permission to use NVML",
}


@dataclass(frozen=True, slots=True)
class NotAvailable:
    """The value is not there: None in the snapshot."""

    call: str
    reason: str  # not_supported | function_not_found | no_permission | no_data | not_found
    permanent: bool  # True: this GPU will not have it; do not ask every poll


# every exception an NVML binding call raises for an NVML outcome
NVML_ERRORS: tuple[type[BaseException], ...] = (pynvml.NVMLError, *_LIBRARY_MISMATCH)

_missing_logged: set[str] = set()
_missing_lock = threading.Lock()


def classify(exc: BaseException, call: str) -> NotAvailable | NvmlFinding:
    """What an exception from the NVML call `call` means for the snapshot.

    A missing function (an older driver) is logged once per function for the
    whole process, since the library is process-wide.
    """
    if isinstance(exc, DeadlineExceeded):
        return NvmlFinding(FindingKind.DEADLINE, call, exc.detail)
    if _LIBRARY_MISMATCH and isinstance(exc, _LIBRARY_MISMATCH):
        log_function_not_found(call)
        return NotAvailable(call, "function_not_found", True)
    if isinstance(exc, pynvml.NVMLError):
        kind = _FINDINGS.get(type(exc))
        if kind is not None:
            return NvmlFinding(kind, call, str(exc))
        reason = _NOT_AVAILABLE.get(type(exc))
        if reason is not None:
            if type(exc) is pynvml.NVMLError_FunctionNotFound:
                log_function_not_found(call)
            return NotAvailable(call, *reason)
        return NvmlFinding(FindingKind.NVML_ERROR, call, f"{str(exc)} (NVML error {exc.value})")
    return NvmlFinding(FindingKind.NVML_ERROR, call, f"{type(exc).__name__}: {exc}")


def is_function_not_found(exc: BaseException) -> bool:
    """The driver (or binding) lacks this function: try an older version of it."""
    return isinstance(exc, pynvml.NVMLError_FunctionNotFound) or bool(
        _LIBRARY_MISMATCH and isinstance(exc, _LIBRARY_MISMATCH)
    )


def is_invalid_argument(exc: BaseException) -> bool:
    """NVML rejected an argument, e.g. an NVLink index past the GPU's last link."""
    return isinstance(exc, pynvml.NVMLError_InvalidArgument)


def is_timeout(exc: BaseException) -> bool:
    """nvmlEventSetWait's "no event within the timeout" (not a fault)."""
    return isinstance(exc, pynvml.NVMLError_Timeout)


def unavailable_reason(exc: BaseException) -> str:
    """One line on why NVML cannot be used at all (nvmlInit failed)."""
    reason = UNAVAILABLE_REASONS.get(type(exc)) if isinstance(exc, pynvml.NVMLError) else None
    return f"NVML unavailable: {reason or f'nvmlInit failed: {exc}'}"


def log_function_not_found(call: str) -> None:
    """Log, once per process, that the driver lacks `call` (so an older one is used)."""
    with _missing_lock:
        if call in _missing_logged:
            return
        _missing_logged.add(call)
    log.info("nvml_function_not_found", call=call)
