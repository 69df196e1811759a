"""NvmlBackend over a fake pynvml: values, missing values, findings, deadlines, events."""

from __future__ import annotations

import inspect
import sys
import threading
import time
from collections.abc import Iterator

import pynvml
import pytest
from structlog.testing import capture_logs

from harness import wait_until
from gpuguard.nvml.backend import Backend, BackendUnavailable
from gpuguard.nvml.deadline import DeadlineRunner
from gpuguard.nvml.events import EVENT_WAIT_FNS
from gpuguard.nvml.real import EVENT_SLICE_S, NvmlBackend
from gpuguard.nvml.types import FindingKind, GpuProcess, NvmlEvent

from .fake_pynvml import FakeNvml, make_gpus

# the NVML deadline: long enough that no poll of the fake (every field, two GPUs) misses it on
# a loaded 2-core machine (0.3 s was missed once)
TIMEOUT_S = 1.0
# an upper bound on a wait measured across threads: wide enough for a loaded 2-core
# machine, still far below the hang it must not wait out
SLACK_S = 2.0
XID = pynvml.nvmlEventTypeXidCriticalError
DBE = pynvml.nvmlEventTypeDoubleBitEccError
SBE = pynvml.nvmlEventTypeSingleBitEccError


@pytest.fixture
def fake() -> Iterator[FakeNvml]:
    fake = FakeNvml(make_gpus(2))
    yield fake
    fake.release()


@pytest.fixture
def backend(fake: FakeNvml) -> Iterator[NvmlBackend]:
    backend = NvmlBackend(timeout_s=TIMEOUT_S, runner=DeadlineRunner("test-nvml"), nvml_module=fake, open_timeout_s=2.0)
    yield backend
    fake.release()
    backend.close()


def calls_on(fake: FakeNvml, index: int) -> int:
    return sum(n for (_, gpu), n in fake.calls.items() if gpu == index)


def test_is_a_backend(backend: NvmlBackend) -> None:
    """Every member of the Backend protocol, with the protocol's parameters: a
    structural check, since Backend is not runtime-checkable."""
    methods = {"open", "close", "driver_info", "inventory", "poll", "wait_events"}
    assert methods <= {name for name, value in vars(Backend).items() if callable(value) and not name.startswith("_")}
    for name in methods:
        ours, theirs = inspect.signature(getattr(backend, name)), inspect.signature(getattr(Backend, name))
        assert list(ours.parameters) == [p for p in theirs.parameters if p != "self"], name
    assert set(Backend.__annotations__) == {"kind", "simulator"}
    assert backend.kind == "nvml"
    assert backend.simulator is None  # real GPUs take no injected faults; the pool resets through NVML
    _: Backend = backend


def test_inventory_and_driver_info(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.gpus[1].serial = "1650924000777"
    backend.open()
    gpus = backend.inventory()
    assert [g.index for g in gpus] == [0, 1]
    assert gpus[0].uuid == fake.gpus[0].uuid
    assert gpus[1].pci_bus_id == "00000000:19:00.0"  # decoded from the real nvmlPciInfo_t bytes
    assert gpus[1].name == "NVIDIA H200"
    assert gpus[1].serial == "1650924000777"
    assert gpus[0].memory_total_bytes == 141 * 1024**3
    info = backend.driver_info()
    assert (info.driver_version, info.cuda_driver_version, info.nvml_version) == ("570.124.06", "12.8", "12.570.124.06")


def test_full_snapshot(fake: FakeNvml, backend: NvmlBackend) -> None:
    gpu = fake.gpus[0]
    gpu.clock_reasons = 0x80 | 0x20 | 0x01  # HW power brake, SW thermal, idle
    gpu.ecc = {
        (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_VOLATILE_ECC): 3,
        (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC): 1,
        (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_AGGREGATE_ECC): 30,
        (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_AGGREGATE_ECC): 2,
    }
    gpu.retired_pages = {
        pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS: [0x1000, 0x2000],
        pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR: [0x3000],
    }
    gpu.retired_pending = pynvml.NVML_FEATURE_ENABLED
    gpu.remapped_rows = (4, 1, 1, 0)
    gpu.pcie_replay = 7
    gpu.nvlinks = {0: 1, 1: 0, 2: 1}  # link 1 inactive: not counted
    gpu.nvlink_errors = {
        (0, pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT): 5,
        (2, pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT): 1,
        (1, pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT): 100,
        (2, pynvml.NVML_NVLINK_ERROR_DL_REPLAY): 2,
        (0, pynvml.NVML_NVLINK_ERROR_DL_RECOVERY): 9,
    }
    gpu.recovery_action = 1
    gpu.processes = [(4242, 3 * 1024**3), (4343, None)]
    backend.open()
    before = time.time()
    snap = backend.poll()[0]
    assert snap.timestamp >= before
    assert (snap.index, snap.uuid, snap.findings) == (0, gpu.uuid, ())
    assert (snap.gpu_util_pct, snap.mem_util_pct) == (40, 20)
    assert (snap.memory_used_bytes, snap.memory_total_bytes) == (2 * 1024**3, 141 * 1024**3)
    assert snap.temperature_c == 55
    assert snap.power_w == pytest.approx(350.25)
    assert snap.power_limit_w == pytest.approx(700.0)
    assert snap.sm_clock_mhz == 1980
    assert snap.clock_event_reasons == 0xA1
    assert (snap.hw_slowdown, snap.thermal_slowdown, snap.power_brake) == (True, True, True)
    assert snap.ecc_enabled is True
    assert (snap.ecc_volatile_corrected, snap.ecc_volatile_uncorrected) == (3, 1)
    assert (snap.ecc_aggregate_corrected, snap.ecc_aggregate_uncorrected) == (30, 2)
    assert (snap.retired_pages_sbe, snap.retired_pages_dbe, snap.retired_pages_pending) == (2, 1, True)
    remap = (snap.remap_correctable, snap.remap_uncorrectable, snap.remap_pending, snap.remap_failure)
    assert remap == (4, 1, True, False)
    assert snap.pcie_replay_counter == 7
    assert (snap.nvlink_crc_errors, snap.nvlink_replay_errors, snap.nvlink_recovery_errors) == (6, 2, 9)
    assert snap.recovery_action == 1
    assert snap.processes == (GpuProcess(4242, 3 * 1024**3), GpuProcess(4343, None))


@pytest.mark.parametrize(
    ("bits", "hw", "thermal", "brake"),
    [
        (0x00, False, False, False),
        (0x01 | 0x04, False, False, False),  # idle, SW power cap
        (0x08, True, False, False),  # HW slowdown
        (0x40, True, True, False),  # HW thermal
        (0x20, False, True, False),  # SW thermal
        (0x80, True, False, True),  # HW power brake
    ],
)
def test_clock_event_reasons(
    fake: FakeNvml, backend: NvmlBackend, bits: int, hw: bool, thermal: bool, brake: bool
) -> None:
    fake.gpus[0].clock_reasons = bits
    backend.open()
    snap = backend.poll()[0]
    decoded = (snap.clock_event_reasons, snap.hw_slowdown, snap.thermal_slowdown, snap.power_brake)
    assert decoded == (bits, hw, thermal, brake)


def test_not_supported_is_none_and_asked_once(fake: FakeNvml, backend: NvmlBackend) -> None:
    gpu = fake.gpus[0]
    gpu.errors = {
        "nvmlDeviceGetSerial": pynvml.NVML_ERROR_NOT_SUPPORTED,
        "nvmlDeviceGetPcieReplayCounter": pynvml.NVML_ERROR_NOT_SUPPORTED,
        "nvmlDeviceGetRetiredPages": pynvml.NVML_ERROR_NOT_SUPPORTED,
        "nvmlDeviceGetEccMode": pynvml.NVML_ERROR_NO_PERMISSION,
        "nvmlDeviceGetPowerUsage": pynvml.NVML_ERROR_NO_DATA,  # transient: asked again
    }
    backend.open()
    assert backend.inventory()[0].serial is None
    for _ in range(3):
        snap = backend.poll()[0]
        assert snap.findings == ()
        assert snap.pcie_replay_counter is None
        assert snap.retired_pages_sbe is snap.retired_pages_dbe is None
        assert snap.ecc_enabled is None
        assert snap.power_w is None
        assert snap.temperature_c == 55
    assert fake.calls[("nvmlDeviceGetPcieReplayCounter", 0)] == 1
    assert fake.calls[("nvmlDeviceGetRetiredPages", 0)] == 1
    assert fake.calls[("nvmlDeviceGetEccMode", 0)] == 1
    assert fake.calls[("nvmlDeviceGetPowerUsage", 0)] == 3
    # "unsupported" is per GPU: GPU 1 still reports it
    assert backend.poll()[1].pcie_replay_counter == 0


def test_no_nvlink_is_none_and_probed_once(fake: FakeNvml, backend: NvmlBackend) -> None:
    backend.open()
    for _ in range(3):
        snap = backend.poll()[0]
        assert (snap.nvlink_crc_errors, snap.nvlink_replay_errors, snap.nvlink_recovery_errors) == (None, None, None)
    assert fake.calls[("nvmlDeviceGetNvLinkState", 0)] == pynvml.NVML_NVLINK_MAX_LINKS


def test_gpu_lost_on_one_gpu(fake: FakeNvml, backend: NvmlBackend) -> None:
    backend.open()
    fake.gpus[1].lost = True
    before = calls_on(fake, 1)
    ok, lost = backend.poll()
    assert ok.findings == () and ok.temperature_c == 55 and ok.ecc_volatile_corrected == 0
    assert [(f.kind, f.call) for f in lost.findings] == [(FindingKind.GPU_LOST, "nvmlDeviceGetUtilizationRates")]
    assert lost.has(FindingKind.GPU_LOST)
    assert lost.gpu_util_pct is None and lost.temperature_c is None and lost.processes == ()
    assert calls_on(fake, 1) - before == 1  # the first call short-circuits the rest
    assert backend.poll()[1].has(FindingKind.GPU_LOST)  # lost is not "unsupported": asked again


def test_reset_required_and_unknown_are_findings_beside_values(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.gpus[0].errors = {
        "nvmlDeviceGetTemperature": pynvml.NVML_ERROR_UNKNOWN,
        "nvmlDeviceGetRemappedRows": pynvml.NVML_ERROR_RESET_REQUIRED,
    }
    backend.open()
    for _ in range(2):
        snap = backend.poll()[0]
        assert [(f.kind, f.call) for f in snap.findings] == [
            (FindingKind.NVML_ERROR, "nvmlDeviceGetTemperature"),
            (FindingKind.RESET_REQUIRED, "nvmlDeviceGetRemappedRows"),
        ]
        assert snap.temperature_c is None and snap.remap_pending is None
        assert snap.gpu_util_pct == 40 and snap.processes == ()
    assert fake.calls[("nvmlDeviceGetTemperature", 0)] == 2


def test_hung_gpu_gets_deadline_while_others_complete(fake: FakeNvml, backend: NvmlBackend) -> None:
    backend.open()
    release = threading.Event()
    fake.gpus[1].hangs["nvmlDeviceGetTemperature"] = release

    start = time.monotonic()
    ok, hung = backend.poll()
    elapsed = time.monotonic() - start
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + SLACK_S  # the deadline, not the hung call (held until release)
    assert ok.findings == () and ok.temperature_c == 55 and ok.recovery_action == 0
    assert [(f.kind, f.call) for f in hung.findings] == [(FindingKind.DEADLINE, "nvmlDeviceGetTemperature")]
    assert hung.gpu_util_pct is None and hung.temperature_c is None

    hung_calls = calls_on(fake, 1)
    ok, hung = backend.poll()  # the stuck lane answers at once: nothing is queued behind the hung call
    assert calls_on(fake, 1) == hung_calls
    assert ok.findings == ()
    assert hung.findings[0].kind is FindingKind.DEADLINE
    assert hung.findings[0].call == "nvmlDeviceGetTemperature"
    assert "still blocked" in hung.findings[0].detail

    release.set()
    recovered = wait_until(lambda: (snap := backend.poll()[1]).findings == () and snap, SLACK_S, "GPU 1 answering again", 0.02)
    assert recovered.findings == () and recovered.temperature_c == 55


def test_missing_versioned_functions_fall_back_once(fake: FakeNvml) -> None:
    fake.driver_missing = {
        "nvmlDeviceGetCurrentClocksEventReasons",
        "nvmlDeviceGetComputeRunningProcesses_v3",
        "nvmlSystemGetCudaDriverVersion_v2",
    }
    fake.gpus[0].clock_reasons = 0x40
    fake.gpus[1].processes = [(77, 1024)]
    backend = NvmlBackend(timeout_s=TIMEOUT_S, runner=DeadlineRunner("test-fallback"), nvml_module=fake)
    with capture_logs() as logs:
        backend.open()
        for _ in range(3):
            snaps = backend.poll()
    backend.close()
    assert snaps[0].findings == () and snaps[0].thermal_slowdown is True and snaps[0].clock_event_reasons == 0x40
    assert snaps[1].processes == (GpuProcess(77, 1024),)
    v3 = sum(n for (fn, _), n in fake.calls.items() if fn == "nvmlDeviceGetComputeRunningProcesses_v3")
    events = sum(n for (fn, _), n in fake.calls.items() if fn == "nvmlDeviceGetCurrentClocksEventReasons")
    assert v3 == 1 and events == 1  # probed once for the whole driver, then the fallback only
    assert fake.calls[("nvmlDeviceGetComputeRunningProcesses_v2", 1)] == 3
    missing = [e["call"] for e in logs if e["event"] == "nvml_function_not_found"]
    assert len(missing) == len(set(missing))


def test_cuda_version_from_the_older_function(fake: FakeNvml) -> None:
    fake.driver_missing = {"nvmlSystemGetCudaDriverVersion_v2"}
    backend = NvmlBackend(timeout_s=TIMEOUT_S, runner=DeadlineRunner("test-cuda"), nvml_module=fake)
    backend.open()
    assert backend.driver_info().cuda_driver_version == "12.8"
    backend.close()


def test_older_binding_without_new_names(fake: FakeNvml) -> None:
    fake.binding_lacks = {
        "nvmlDeviceGetCurrentClocksEventReasons",
        "nvmlDeviceGetComputeRunningProcesses_v3",
        "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION",
    }
    fake.gpus[0].clock_reasons = 0x08
    backend = NvmlBackend(timeout_s=TIMEOUT_S, runner=DeadlineRunner("test-old"), nvml_module=fake)
    backend.open()
    snap = backend.poll()[0]
    backend.close()
    assert snap.findings == ()
    assert snap.hw_slowdown is True
    assert snap.recovery_action is None
    assert fake.calls[("nvmlDeviceGetFieldValues", 0)] == 0
    assert fake.calls[("nvmlDeviceGetCurrentClocksThrottleReasons", 0)] == 1


def test_recovery_action_unknown_to_the_driver(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.gpus[0].recovery_action = None
    backend.open()
    for _ in range(2):
        snap = backend.poll()[0]
        assert snap.recovery_action is None and snap.findings == ()
    assert fake.calls[("nvmlDeviceGetFieldValues", 0)] == 1


def test_events_are_mapped(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.gpus[1].supported_events = XID
    backend.open()
    assert backend.wait_events(0.05) == []
    assert backend.registered_events() == {
        fake.gpus[0].uuid: ["xid", "ecc_dbe", "ecc_sbe"],
        fake.gpus[1].uuid: ["xid"],
    }
    before = time.time()
    fake.emit(1, XID, 79)
    fake.emit(1, DBE)  # not registered on GPU 1: never delivered
    fake.emit(0, DBE)
    fake.emit(0, SBE)
    events = backend.wait_events(1.0)
    assert [(e.uuid, e.event_type, e.data) for e in events] == [
        (fake.gpus[1].uuid, "xid", 79),
        (fake.gpus[0].uuid, "ecc_dbe", 0),
        (fake.gpus[0].uuid, "ecc_sbe", 0),
    ]
    assert all(isinstance(e, NvmlEvent) and e.timestamp >= before for e in events)


def test_wait_events_times_out_empty(backend: NvmlBackend) -> None:
    backend.open()
    start = time.monotonic()
    assert backend.wait_events(0.2) == []
    assert 0.2 <= time.monotonic() - start < 0.2 + SLACK_S  # it waits the timeout out, and returns


def test_wait_events_falls_back_to_unversioned_wait(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.driver_missing = {"nvmlEventSetWait_v2"}
    backend.open()
    fake.emit(0, XID, 13)
    assert [(e.event_type, e.data) for e in backend.wait_events(1.0)] == [("xid", 13)]
    assert fake.calls[("nvmlEventSetWait_v2", None)] == 1


def test_no_event_support_blocks_then_empty(fake: FakeNvml, backend: NvmlBackend) -> None:
    for gpu in fake.gpus:
        gpu.supported_events = pynvml.nvmlEventTypePState
    backend.open()
    start = time.monotonic()
    assert backend.wait_events(0.2) == []
    assert time.monotonic() - start >= 0.2
    assert backend.registered_events() == {fake.gpus[0].uuid: [], fake.gpus[1].uuid: []}
    assert fake.event_sets[0].freed


def test_close_ends_a_waiting_wait_and_frees_the_set(fake: FakeNvml, backend: NvmlBackend) -> None:
    backend.open()
    backend.wait_events(0.01)  # registers
    got: list[list[NvmlEvent]] = []
    def waits() -> int:
        return sum(fake.calls[(fn, None)] for fn in EVENT_WAIT_FNS)

    before = waits()
    waiter = threading.Thread(target=lambda: got.append(backend.wait_events(5.0)))
    waiter.start()
    wait_until(lambda: waits() > before, SLACK_S, "the waiter inside nvmlEventSetWait", 0.01)
    start = time.monotonic()
    backend.close()
    waiter.join(timeout=EVENT_SLICE_S + SLACK_S)
    assert not waiter.is_alive() and got == [[]]
    # within the slice it was waiting in (plus a loaded machine's slack), not the 5 s it asked for
    assert time.monotonic() - start < EVENT_SLICE_S + SLACK_S
    assert fake.event_sets[0].freed and not fake.initialized


def test_open_without_library(fake: FakeNvml) -> None:
    fake.init_error = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
    backend = NvmlBackend(timeout_s=TIMEOUT_S, runner=DeadlineRunner("test-nolib"), nvml_module=fake)
    with pytest.raises(BackendUnavailable, match="libnvidia-ml.so.1"):
        backend.open()
    fake.init_error = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    with pytest.raises(BackendUnavailable, match="driver is not loaded"):
        backend.open()
    with pytest.raises(RuntimeError, match="not open"):
        backend.poll()


def test_open_without_the_binding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    with pytest.raises(BackendUnavailable, match="nvidia-ml-py"):
        NvmlBackend(timeout_s=TIMEOUT_S, runner=DeadlineRunner("test-nobinding")).open()


def test_close_then_open_again(fake: FakeNvml, backend: NvmlBackend) -> None:
    backend.open()
    backend.wait_events(0.01)
    assert backend.poll()[0].findings == ()
    backend.close()
    assert not fake.initialized and fake.shutdown_calls == 1 and fake.event_sets[0].freed
    with pytest.raises(RuntimeError):
        backend.poll()
    backend.close()  # twice is harmless
    assert fake.shutdown_calls == 1
    backend.open()
    assert fake.init_calls == 2
    assert [s.findings for s in backend.poll()] == [(), ()]
    fake.emit(0, XID, 48)
    assert [e.data for e in backend.wait_events(1.0)] == [48]
    assert len(fake.event_sets) == 2 and not fake.event_sets[1].freed


def test_gpu_gone_after_reopen_stays_as_lost(fake: FakeNvml, backend: NvmlBackend) -> None:
    backend.open()
    gone = fake.gpus[1].uuid
    backend.close()
    fake.gpus.pop()
    backend.open()
    assert [g.uuid for g in backend.inventory()] == [fake.gpus[0].uuid, gone]
    ok, lost = backend.poll()
    assert ok.findings == ()
    assert lost.uuid == gone and lost.has(FindingKind.GPU_LOST) and lost.temperature_c is None


def test_gpu_unreachable_at_first_open_is_left_out(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.gpus[1].lost = True
    with capture_logs() as logs:
        backend.open()
    assert [g.index for g in backend.inventory()] == [0]
    assert any(e["event"] == "nvml_gpu_unreachable" and e["gpu_index"] == 1 for e in logs)
    assert len(backend.poll()) == 1


def test_binding_without_any_process_function(fake: FakeNvml) -> None:
    fake.binding_lacks = {
        "nvmlDeviceGetComputeRunningProcesses_v3",
        "nvmlDeviceGetComputeRunningProcesses_v2",
        "nvmlDeviceGetComputeRunningProcesses",
    }
    backend = NvmlBackend(timeout_s=TIMEOUT_S, runner=DeadlineRunner("test-noprocs"), nvml_module=fake)
    backend.open()
    with capture_logs() as logs:
        snaps = [backend.poll()[0] for _ in range(2)]
    backend.close()
    assert all(s.processes == () and s.findings == () and s.temperature_c == 55 for s in snaps)
    missing = [e["call"] for e in logs if e["event"] == "nvml_function_not_found"]
    assert set(missing) <= {"nvmlDeviceGetComputeRunningProcesses_v3"}


def test_open_twice_is_harmless(fake: FakeNvml, backend: NvmlBackend) -> None:
    backend.open()
    backend.open()
    assert fake.init_calls == 1
