"""`Monitor` on hand-built inventories, snapshots and Xids: no daemon process."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gpuguard.config import HealthConfig
from gpuguard.daemon.monitor import HISTORY_S, Monitor
from gpuguard.events import Event
from gpuguard.health.types import Action, GpuState, Severity
from gpuguard.nvml.types import FindingKind, GpuInfo, GpuSnapshot, NvmlFinding
from gpuguard.observations import XidObservation

T0 = 1_700_000_000.0
GPU0 = GpuInfo(0, "GPU-aaaaaaaa-0000-0000-0000-000000000000", "00000000:18:00.0", "H100", None, None)
GPU1 = GpuInfo(1, "GPU-BBBBBBBB-1111-1111-1111-111111111111", "00000000:3B:00.0", "H100", None, None)


def snap(gpu: GpuInfo, ts: float = T0, **metrics: object) -> GpuSnapshot:
    return GpuSnapshot(index=gpu.index, uuid=gpu.uuid, timestamp=ts, **metrics)  # type: ignore[arg-type]


def xid(
    code: int, ts: float = T0, source: str = "kmsg", pci: str | None = "0000:3b:00", **kw: object
) -> XidObservation:
    return XidObservation(xid=code, timestamp=ts, source=source, pci_bus_id=pci, **kw)  # type: ignore[arg-type]


@pytest.fixture
def monitor() -> Monitor:
    """Two GPUs, both with a healthy first snapshot and a first verdict."""
    mon = Monitor([GPU0, GPU1], HealthConfig())
    mon.observe_snapshots([snap(GPU0), snap(GPU1)])
    assert mon.evaluate(T0) == []
    return mon


def kinds(events: list[Event]) -> list[tuple[str, str | None]]:
    return [(e.kind, e.gpu) for e in events]


# --- Xids ----------------------------------------------------------------


def test_kernel_log_xid_maps_pci_to_gpu_and_makes_one_event(monitor: Monitor) -> None:
    event = monitor.observe_xid(xid(79, pid=4242, process_name="python", message="GPU has fallen off the bus."))
    assert event is not None
    assert (event.kind, event.gpu, event.xid) == ("xid", GPU1.uuid, 79)
    assert event.severity == Severity.CRITICAL
    assert event.data["action"] == Action.REBOOT_NODE.value
    assert event.data["source"] == "kmsg"
    assert event.data["pci_bus_id"] == GPU1.pci_bus_id
    assert (event.data["pid"], event.data["process"]) == (4242, "python")
    assert event.ts == T0
    # the evaluation that follows faults GPU 1 without a second xid event
    assert monitor.evaluate(T0 + 0.5) == []
    verdict = monitor.verdict(GPU1.uuid)
    assert verdict is not None and verdict.state == GpuState.FAULTED and verdict.action == Action.REBOOT_NODE
    assert monitor.verdict(GPU0.uuid).state == GpuState.HEALTHY  # type: ignore[union-attr]


def test_observation_uuid_wins_over_pci(monitor: Monitor) -> None:
    event = monitor.observe_xid(xid(48, source="nvml", pci=None, uuid=GPU0.uuid))
    assert event is not None and event.gpu == GPU0.uuid and event.data["action"] == "reset_gpu"


def test_same_xid_from_nvml_events_within_10s_counts_once(monitor: Monitor) -> None:
    assert monitor.observe_xid(xid(79)) is not None
    assert monitor.observe_xid(xid(79, ts=T0 + 9.5, source="nvml", pci=None, uuid=GPU1.uuid)) is None
    assert len(monitor.tracks[GPU1.uuid].xids) == 1
    # past the window it is a new fault
    assert monitor.observe_xid(xid(79, ts=T0 + 20, source="nvml", pci=None, uuid=GPU1.uuid)) is not None


def test_same_source_burst_counts_once_but_5s_apart_counts_twice(monitor: Monitor) -> None:
    assert monitor.observe_xid(xid(13)) is not None
    assert monitor.observe_xid(xid(13, ts=T0 + 1.5)) is None
    assert monitor.observe_xid(xid(13, ts=T0 + 5)) is not None
    assert len(monitor.tracks[GPU1.uuid].xids) == 2
    monitor.evaluate(T0 + 6)
    verdict = monitor.verdict(GPU1.uuid)
    assert verdict is not None and "seen 2 times" in (verdict.reason or "")


def test_different_xids_at_once_are_separate(monitor: Monitor) -> None:
    first, second = monitor.observe_xid(xid(13)), monitor.observe_xid(xid(31))
    assert first is not None and second is not None
    assert [(e.kind, e.gpu, e.xid, e.ts, e.data["action"]) for e in (first, second)] == [
        ("xid", GPU1.uuid, 13, T0, Action.RESTART_APP.value),
        ("xid", GPU1.uuid, 31, T0, Action.RESTART_APP.value),
    ]
    assert [x.xid for x in monitor.tracks[GPU1.uuid].xids] == [13, 31]
    assert monitor.evaluate(T0 + 1) == []  # each was reported once, as it came
    findings = monitor.verdict(GPU1.uuid).findings  # type: ignore[union-attr]
    assert sorted(f.xid for f in findings if f.xid is not None) == [13, 31]


def test_xid_of_unknown_pci_id_is_ignored(monitor: Monitor) -> None:
    assert monitor.observe_xid(xid(79, pci="0000:99:00")) is None
    assert monitor.observe_xid(xid(79, pci=None)) is None
    assert monitor.observe_xid(xid(79, pci=None, uuid="GPU-not-ours")) is None
    assert all(not t.xids for t in monitor.tracks.values())
    assert monitor.evaluate(T0 + 1) == []


def test_historical_xid_is_silent_while_gpu_shows_no_fault(monitor: Monitor) -> None:
    assert monitor.observe_xid(xid(79, historical=True)) is None
    assert monitor.evaluate(T0 + 1) == []
    assert monitor.verdict(GPU1.uuid).state == GpuState.HEALTHY  # type: ignore[union-attr]


def test_historical_xid_acts_when_snapshot_shows_gpu_lost(monitor: Monitor) -> None:
    assert monitor.observe_xid(xid(79, historical=True)) is None
    lost = snap(GPU1, T0 + 1, findings=(NvmlFinding(FindingKind.GPU_LOST, "poll"),))
    monitor.observe_snapshots([lost])
    events = monitor.evaluate(T0 + 1)
    assert sorted(kinds(events)) == [("gpu_lost", GPU1.uuid), ("xid", GPU1.uuid)]
    assert next(e for e in events if e.kind == "xid").xid == 79
    assert monitor.verdict(GPU1.uuid).state == GpuState.FAULTED  # type: ignore[union-attr]


def test_restart_app_xid_expires_after_its_window(monitor: Monitor) -> None:
    window = monitor.config.restart_app_window_s
    monitor.observe_xid(xid(13))
    monitor.evaluate(T0 + 1)
    verdict = monitor.verdict(GPU1.uuid)
    assert verdict is not None and verdict.action == Action.RESTART_APP
    assert verdict.state == GpuState.HEALTHY  # restarting the app leaves the GPU usable
    monitor.evaluate(T0 + window - 1)
    assert monitor.tracks[GPU1.uuid].xids
    monitor.evaluate(T0 + window + 1)
    assert monitor.tracks[GPU1.uuid].xids == []
    assert monitor.verdict(GPU1.uuid).action == Action.NONE  # type: ignore[union-attr]


def test_reset_class_xid_does_not_expire(monitor: Monitor) -> None:
    monitor.observe_xid(xid(48))
    monitor.evaluate(T0 + 3600)
    assert monitor.verdict(GPU1.uuid).state == GpuState.FAULTED  # type: ignore[union-attr]


def test_clear_xids_after_reset_makes_gpu_healthy_again(monitor: Monitor) -> None:
    monitor.observe_xid(xid(48))
    monitor.observe_xid(xid(13))
    assert monitor.evaluate(T0 + 1) == []
    assert monitor.verdict(GPU1.uuid).state == GpuState.FAULTED  # type: ignore[union-attr]
    monitor.clear_xids(GPU1.uuid, {Action.RESET_GPU}, before=T0 + 1.5)
    assert [x.xid for x in monitor.tracks[GPU1.uuid].xids] == [13]
    events = monitor.evaluate(T0 + 2)
    assert kinds(events) == [("gpu_recovered", GPU1.uuid)]
    assert monitor.verdict(GPU1.uuid).state == GpuState.HEALTHY  # type: ignore[union-attr]


def test_clear_xids_does_not_report_remaining_xids_again(monitor: Monitor) -> None:
    monitor.observe_xid(xid(48))
    monitor.observe_xid(xid(79))
    monitor.evaluate(T0 + 1)
    monitor.clear_xids(GPU1.uuid, {Action.RESET_GPU}, before=T0 + 1.5)
    assert monitor.evaluate(T0 + 2) == []  # Xid 79 was reported already
    assert monitor.verdict(GPU1.uuid).action == Action.REBOOT_NODE  # type: ignore[union-attr]


def test_a_late_report_of_an_xid_from_before_the_reset_is_no_new_fault(monitor: Monitor) -> None:
    """NVML's event and the kernel log report one Xid; the slower one can come in after the reset
    it led to. A fresh Xid after the reset counts again, from either source."""
    assert monitor.observe_xid(xid(95, ts=T0 + 1, source="nvml", pci=None, uuid=GPU1.uuid)) is not None
    monitor.evaluate(T0 + 1)
    monitor.clear_xids(GPU1.uuid, {Action.RESET_GPU}, before=T0 + 2)  # the reset began at T0 + 2
    assert monitor.observe_xid(xid(95, ts=T0 + 1)) is None  # the kernel log's line of the same Xid, late
    monitor.evaluate(T0 + 3)
    assert monitor.verdict(GPU1.uuid).state == GpuState.HEALTHY  # type: ignore[union-attr]
    assert monitor.observe_xid(xid(79, ts=T0 + 1)) is not None  # not the reset's to deal with: still news
    assert monitor.observe_xid(xid(95, ts=T0 + 4)) is not None  # the fault came back after the reset


def test_after_an_operator_s_include_only_xids_from_then_on_count(monitor: Monitor) -> None:
    monitor.observe_xid(xid(79, ts=T0 + 1))
    monitor.forget(GPU1.uuid, T0 + 5)
    assert monitor.observe_xid(xid(79, ts=T0 + 1, source="nvml", pci=None, uuid=GPU1.uuid)) is None
    assert monitor.observe_xid(xid(79, ts=T0 + 6)) is not None


# --- findings from snapshots --------------------------------------------


def test_new_finding_gives_one_event_and_repeats_give_none(monitor: Monitor) -> None:
    monitor.observe_snapshots([snap(GPU0, T0 + 1, temperature_c=90), snap(GPU1, T0 + 1, temperature_c=40)])
    events = monitor.evaluate(T0 + 1)
    assert kinds(events) == [("thermal", GPU0.uuid)]
    assert events[0].severity == Severity.WARNING and events[0].data["action"] == "none"
    assert monitor.verdict(GPU0.uuid).state == GpuState.DEGRADED  # type: ignore[union-attr]
    monitor.observe_snapshots([snap(GPU0, T0 + 2, temperature_c=91)])
    assert monitor.evaluate(T0 + 2) == []


def test_same_kind_with_a_stronger_action_is_a_new_event(monitor: Monitor) -> None:
    monitor.observe_snapshots([snap(GPU0, T0 + 1, temperature_c=90)])
    assert len(monitor.evaluate(T0 + 1)) == 1
    monitor.observe_snapshots([snap(GPU0, T0 + 2, temperature_c=96)])
    events = monitor.evaluate(T0 + 2)
    assert kinds(events) == [("thermal", GPU0.uuid)]
    assert events[0].severity == Severity.CRITICAL and events[0].data["action"] == Action.INSPECT.value


def test_two_findings_of_one_kind_with_different_actions_each_give_one(monitor: Monitor) -> None:
    # held hardware slowdown (no action) and a faulting temperature (inspect)
    hold = monitor.config.hw_slowdown_degraded_s
    for step in range(int(hold) + 2):
        monitor.observe_snapshots([snap(GPU0, T0 + 1 + step, hw_slowdown=True, temperature_c=50)])
    assert monitor.evaluate(T0 + 1) == []
    now = T0 + hold + 10
    monitor.observe_snapshots([snap(GPU0, now, hw_slowdown=True, temperature_c=97)])
    events = monitor.evaluate(now)
    assert [e.kind for e in events] == ["thermal", "thermal"]
    assert sorted(e.data["action"] for e in events) == ["hardware_inspection", "none"]
    assert monitor.evaluate(now) == []


def test_gpu_back_to_healthy_gives_gpu_recovered(monitor: Monitor) -> None:
    monitor.observe_snapshots([snap(GPU0, T0 + 1, temperature_c=96)])
    monitor.evaluate(T0 + 1)
    monitor.observe_snapshots([snap(GPU0, T0 + 2, temperature_c=60)])
    events = monitor.evaluate(T0 + 2)
    assert kinds(events) == [("gpu_recovered", GPU0.uuid)]
    assert events[0].severity == Severity.INFO and "faulted" in events[0].message
    assert monitor.evaluate(T0 + 3) == []
    # once healthy again, the same fault is news again
    monitor.observe_snapshots([snap(GPU0, T0 + 4, temperature_c=96)])
    assert kinds(monitor.evaluate(T0 + 4)) == [("thermal", GPU0.uuid)]


def test_no_snapshot_is_unknown_never_healthy() -> None:
    mon = Monitor([GPU0], HealthConfig())
    events = mon.evaluate(T0)
    assert kinds(events) == [("no_data", GPU0.uuid)]
    assert mon.verdict(GPU0.uuid).state == GpuState.UNKNOWN  # type: ignore[union-attr]


def test_history_is_bounded(monitor: Monitor) -> None:
    for step in range(1, 81):
        monitor.observe_snapshots([snap(GPU0, T0 + step * 10.0)])
    track = monitor.tracks[GPU0.uuid]
    assert track.snapshot is not None and track.snapshot.timestamp == T0 + 800
    assert track.snapshot.timestamp - track.history[0].timestamp <= HISTORY_S
    assert len(track.history) == int(HISTORY_S / 10)
    timestamps = [s.timestamp for s in track.history]
    assert timestamps == sorted(timestamps)


def test_snapshot_of_unknown_gpu_is_ignored(monitor: Monitor) -> None:
    stranger = replace(snap(GPU0, T0 + 1), uuid="GPU-not-ours")
    monitor.observe_snapshots([stranger])
    assert set(monitor.tracks) == {GPU0.uuid, GPU1.uuid}


# --- naming GPUs -----------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["1", " 1 ", GPU1.uuid, GPU1.uuid.lower(), GPU1.uuid.upper(), "00000000:3B:00.0", "0000:3b:00", "3b:00.0"],
)
def test_resolve_by_index_uuid_or_pci(monitor: Monitor, name: str) -> None:
    assert monitor.resolve(name) == GPU1


@pytest.mark.parametrize("name", ["2", "-1", "GPU-nope", "0000:99:00", ""])
def test_resolve_unknown_names_the_choices(monitor: Monitor, name: str) -> None:
    with pytest.raises(KeyError) as err:
        monitor.resolve(name)
    message = str(err.value)
    assert repr(name) in message and "0..1" in message and "UUID" in message
