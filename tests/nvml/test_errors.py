"""NVML errors are classified once: missing values vs. health findings."""

from __future__ import annotations

import pynvml
import pytest
from structlog.testing import capture_logs

from gpuguard.nvml.deadline import DeadlineExceeded
from gpuguard.nvml.errors import (
    NotAvailable,
    classify,
    is_function_not_found,
    is_invalid_argument,
    is_timeout,
    unavailable_reason,
)
from gpuguard.nvml.types import FindingKind, NvmlFinding


@pytest.mark.parametrize(
    ("code", "reason", "permanent"),
    [
        (pynvml.NVML_ERROR_NOT_SUPPORTED, "not_supported", True),
        (pynvml.NVML_ERROR_FUNCTION_NOT_FOUND, "function_not_found", True),
        (pynvml.NVML_ERROR_NO_PERMISSION, "no_permission", True),
        (pynvml.NVML_ERROR_NO_DATA, "no_data", False),
        (pynvml.NVML_ERROR_NOT_FOUND, "not_found", False),
    ],
)
def test_missing_values_are_not_available(code: int, reason: str, permanent: bool) -> None:
    assert classify(pynvml.NVMLError(code), f"nvmlTestMissing{code}") == NotAvailable(
        f"nvmlTestMissing{code}", reason, permanent
    )


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (pynvml.NVMLError_GpuIsLost(), FindingKind.GPU_LOST),
        (pynvml.NVMLError_ResetRequired(), FindingKind.RESET_REQUIRED),
        (pynvml.NVMLError_Unknown(), FindingKind.NVML_ERROR),
        (pynvml.NVMLError_InvalidState(), FindingKind.NVML_ERROR),
        (pynvml.NVMLError_CorruptedInforom(), FindingKind.NVML_ERROR),
        (OSError("ctypes went wrong"), FindingKind.NVML_ERROR),
    ],
)
def test_health_errors_are_findings(exc: BaseException, kind: FindingKind) -> None:
    outcome = classify(exc, "nvmlDeviceGetTemperature")
    assert isinstance(outcome, NvmlFinding)
    assert outcome.kind is kind
    assert outcome.call == "nvmlDeviceGetTemperature"
    assert outcome.detail


def test_unknown_error_detail_names_the_code() -> None:
    outcome = classify(pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN), "nvmlDeviceGetPowerUsage")
    assert isinstance(outcome, NvmlFinding)
    assert "999" in outcome.detail


def test_deadline_is_a_finding_with_its_detail() -> None:
    outcome = classify(DeadlineExceeded("poll GPU 1", "no answer within 2.0s"), "nvmlDeviceGetTemperature")
    assert outcome == NvmlFinding(FindingKind.DEADLINE, "nvmlDeviceGetTemperature", "no answer within 2.0s")


def test_library_mismatch_counts_as_a_missing_function() -> None:
    exc = pynvml.NVMLLibraryMismatchError("Unversioned function called ...")
    assert classify(exc, "nvmlDeviceGetComputeRunningProcesses") == NotAvailable(
        "nvmlDeviceGetComputeRunningProcesses", "function_not_found", True
    )
    assert is_function_not_found(exc)


def test_missing_function_is_logged_once_per_function() -> None:
    with capture_logs() as logs:
        for _ in range(3):
            classify(pynvml.NVMLError_FunctionNotFound(), "nvmlTestOnceA")
        classify(pynvml.NVMLError_FunctionNotFound(), "nvmlTestOnceB")
        classify(pynvml.NVMLError_NotSupported(), "nvmlTestOnceC")
    missing = [entry["call"] for entry in logs if entry["event"] == "nvml_function_not_found"]
    assert missing == ["nvmlTestOnceA", "nvmlTestOnceB"]


def test_predicates() -> None:
    assert is_timeout(pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT))
    assert not is_timeout(pynvml.NVMLError_Unknown())
    assert is_invalid_argument(pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT))
    assert is_function_not_found(pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND))
    assert not is_function_not_found(pynvml.NVMLError_NotSupported())


@pytest.mark.parametrize(
    ("exc", "words"),
    [
        (pynvml.NVMLError_LibraryNotFound(), "libnvidia-ml.so.1"),
        (pynvml.NVMLError_DriverNotLoaded(), "kernel driver is not loaded"),
        (pynvml.NVMLError_LibRmVersionMismatch(), "differ in version"),
        (pynvml.NVMLError_Unknown(), "nvmlInit failed: Unknown Error"),
    ],
)
def test_unavailable_reason_is_one_line(exc: BaseException, words: str) -> None:
    reason = unavailable_reason(exc)
    assert reason.startswith("NVML unavailable: ")
    assert words in reason
    assert "\n" not in reason
