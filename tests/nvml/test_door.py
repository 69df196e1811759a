"""NvmlDoor, the one way into pynvml: optional calls, versioned fallback, deadlines."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from functools import partial

import pynvml
import pytest
from structlog.testing import capture_logs

from gpuguard.nvml.deadline import DeadlineExceeded, DeadlineRunner
from gpuguard.nvml.door import Gpu, NvmlDoor
from gpuguard.nvml.errors import NotAvailable
from gpuguard.nvml.types import FindingKind, GpuInfo, NvmlFinding

from .fake_pynvml import FakeNvml, make_gpus

TIMEOUT_S = 0.2
MARGIN_S = 2.0  # a deadline kept on a loaded 2-core machine
LONG_S = 10.0  # a call that answers well within this did not wait for its deadline
PROCESS_FNS = (
    "nvmlDeviceGetComputeRunningProcesses_v3",
    "nvmlDeviceGetComputeRunningProcesses_v2",
    "nvmlDeviceGetComputeRunningProcesses",
)
TEMPERATURE = pynvml.NVML_TEMPERATURE_GPU


class BytesNvml(FakeNvml):
    """An older binding: strings come back as bytes."""

    def nvmlSystemGetDriverVersion(self) -> bytes:  # type: ignore[override]
        return super().nvmlSystemGetDriverVersion().encode()


@pytest.fixture
def fake() -> Iterator[FakeNvml]:
    fake = FakeNvml(make_gpus(2))
    fake.nvmlInit()
    yield fake
    fake.release()


@pytest.fixture
def door(fake: FakeNvml) -> NvmlDoor:
    return NvmlDoor(DeadlineRunner("test-door"), fake)


def gpu_of(fake: FakeNvml, index: int) -> Gpu:
    info = GpuInfo(index, fake.gpus[index].uuid, fake.gpus[index].pci_bus_id, "NVIDIA H200", None, None)
    return Gpu(info, fake.nvmlDeviceGetHandleByIndex(index))


def calls_to(fake: FakeNvml, fn: str) -> int:
    return sum(n for (name, _), n in fake.calls.items() if name == fn)


def test_call_passes_the_gpu_handle_and_records_the_call(fake: FakeNvml, door: NvmlDoor) -> None:
    gpu = gpu_of(fake, 1)
    fake.gpus[1].temperature = 71
    assert door.call("nvmlDeviceGetTemperature", TEMPERATURE, gpu=gpu) == 71
    assert gpu.call == "nvmlDeviceGetTemperature"
    assert fake.calls[("nvmlDeviceGetTemperature", 1)] == 1
    # the handle as an argument instead: the GPU's lane record is left alone
    assert door.call("nvmlDeviceGetPowerUsage", gpu.handle) == fake.gpus[1].power_mw
    assert gpu.call == "nvmlDeviceGetTemperature"


def test_bytes_come_back_as_text() -> None:
    fake = BytesNvml(make_gpus(1))
    fake.nvmlInit()
    assert NvmlDoor(DeadlineRunner("test-door-bytes"), fake).call("nvmlSystemGetDriverVersion") == "570.124.06"


def test_optional_call_is_none_when_not_supported(fake: FakeNvml, door: NvmlDoor) -> None:
    fake.gpus[0].errors = {"nvmlDeviceGetSerial": pynvml.NVML_ERROR_NOT_SUPPORTED}
    gpu = gpu_of(fake, 0)
    with capture_logs() as logs:
        assert door.call("nvmlDeviceGetSerial", gpu=gpu, optional=True) is None
    assert logs == []  # a missing value is no warning
    with pytest.raises(pynvml.NVMLError_NotSupported):  # required: the binding's own exception
        door.call("nvmlDeviceGetSerial", gpu=gpu)
    outcome = door.failure(pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED), gpu)
    assert isinstance(outcome, NotAvailable) and outcome.permanent and outcome.call == "nvmlDeviceGetSerial"


def test_optional_call_logs_a_health_error_and_is_none(fake: FakeNvml, door: NvmlDoor) -> None:
    gpu = gpu_of(fake, 0)
    fake.gpus[0].lost = True
    with capture_logs() as logs:
        assert door.call("nvmlDeviceGetSerial", gpu=gpu, optional=True) is None
    assert [(e["event"], e["call"], e["kind"]) for e in logs] == [
        ("nvml_read_failed", "nvmlDeviceGetSerial", FindingKind.GPU_LOST.value)
    ]


def test_versioned_call_falls_back_once_for_every_gpu(fake: FakeNvml, door: NvmlDoor) -> None:
    fake.driver_missing = {"nvmlDeviceGetComputeRunningProcesses_v3"}
    fake.gpus[1].processes = [(77, 1024)]
    gpus = [gpu_of(fake, 0), gpu_of(fake, 1)]
    for _ in range(2):
        assert [len(door.call(PROCESS_FNS, gpu=gpu)) for gpu in gpus] == [0, 1]
    assert calls_to(fake, "nvmlDeviceGetComputeRunningProcesses_v3") == 1  # probed once, for the whole driver
    assert calls_to(fake, "nvmlDeviceGetComputeRunningProcesses_v2") == 4
    assert gpus[1].call == "nvmlDeviceGetComputeRunningProcesses_v2"


def test_versioned_call_skips_names_the_binding_lacks(fake: FakeNvml, door: NvmlDoor) -> None:
    fake.binding_lacks = {"nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetComputeRunningProcesses_v2"}
    gpu = gpu_of(fake, 0)
    assert door.call(PROCESS_FNS, gpu=gpu) == []
    assert gpu.call == "nvmlDeviceGetComputeRunningProcesses"


def test_versioned_call_keeps_a_function_that_exists_but_fails(fake: FakeNvml, door: NvmlDoor) -> None:
    fake.gpus[0].errors = {"nvmlDeviceGetComputeRunningProcesses_v3": pynvml.NVML_ERROR_UNKNOWN}
    gpu = gpu_of(fake, 0)
    for _ in range(2):
        with pytest.raises(pynvml.NVMLError_Unknown):
            door.call(PROCESS_FNS, gpu=gpu)
    assert door.call(PROCESS_FNS, gpu=gpu_of(fake, 1)) == []
    assert calls_to(fake, "nvmlDeviceGetComputeRunningProcesses_v3") == 3
    assert calls_to(fake, "nvmlDeviceGetComputeRunningProcesses_v2") == 0


def test_versioned_call_with_no_function_at_all(fake: FakeNvml, door: NvmlDoor) -> None:
    fake.binding_lacks = set(PROCESS_FNS)
    gpu = gpu_of(fake, 0)
    with pytest.raises(pynvml.NVMLError_FunctionNotFound):
        door.call(PROCESS_FNS, gpu=gpu)
    assert gpu.call == PROCESS_FNS[0]
    assert door.call(PROCESS_FNS, gpu=gpu, optional=True) is None


def test_versioned_call_without_a_gpu(fake: FakeNvml, door: NvmlDoor) -> None:
    fake.driver_missing = {"nvmlSystemGetCudaDriverVersion_v2"}
    family = ("nvmlSystemGetCudaDriverVersion_v2", "nvmlSystemGetCudaDriverVersion")
    assert door.call(family) == door.call(family) == 12080
    assert fake.calls[("nvmlSystemGetCudaDriverVersion_v2", None)] == 1


def test_constants(fake: FakeNvml, door: NvmlDoor) -> None:
    assert door.constant("NVML_FEATURE_ENABLED") == pynvml.NVML_FEATURE_ENABLED
    fake.binding_lacks = {"NVML_FI_DEV_GET_GPU_RECOVERY_ACTION"}
    assert door.constant("NVML_FI_DEV_GET_GPU_RECOVERY_ACTION", optional=True) is None
    with pytest.raises(AttributeError):
        door.constant("NVML_FI_DEV_GET_GPU_RECOVERY_ACTION")
    assert isinstance(door.error(pynvml.NVML_ERROR_GPU_IS_LOST), pynvml.NVMLError_GpuIsLost)


def test_a_hang_hits_the_deadline_and_names_the_call(fake: FakeNvml, door: NvmlDoor) -> None:
    release = threading.Event()
    fake.gpus[1].hangs["nvmlDeviceGetTemperature"] = release
    gpus = [gpu_of(fake, 0), gpu_of(fake, 1)]

    def temperature(gpu: Gpu) -> int:
        door.call("nvmlDeviceGetPowerUsage", gpu=gpu)
        return int(door.call("nvmlDeviceGetTemperature", TEMPERATURE, gpu=gpu))

    start = time.monotonic()
    results = door.on_lanes(((gpu.info.index, "poll", partial(temperature, gpu)) for gpu in gpus), TIMEOUT_S)
    assert TIMEOUT_S <= time.monotonic() - start < TIMEOUT_S + MARGIN_S
    assert results[0] == 55
    stuck = results[1]
    assert isinstance(stuck, DeadlineExceeded)
    finding = door.failure(stuck, gpus[1])
    assert isinstance(finding, NvmlFinding)
    assert (finding.kind, finding.call) == (FindingKind.DEADLINE, "nvmlDeviceGetTemperature")

    start = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="still blocked"):  # a stuck lane answers at once
        door.on_lane(1, "poll", partial(temperature, gpus[1]), LONG_S)
    assert time.monotonic() - start < LONG_S / 2

    release.set()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            assert door.on_lane(1, "poll", partial(temperature, gpus[1]), TIMEOUT_S) == 55
            break
        except DeadlineExceeded:
            time.sleep(0.02)
    else:
        pytest.fail("the lane did not serve again after the call returned")
