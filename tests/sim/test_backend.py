from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

from harness import wait_until
from gpuguard.nvml.types import FindingKind, GpuSnapshot
from gpuguard.sim.backend import SimulatedBackend

SLACK_S = 2.0  # on a measured wait: room for a loaded 2-core machine, still far below the hangs injected


def test_every_snapshot_field_is_populated(backend: SimulatedBackend) -> None:
    before = time.time()
    snaps = backend.poll()
    assert [s.index for s in snaps] == [0, 1]
    assert [s.uuid for s in snaps] == [g.uuid for g in backend.inventory()]
    for snap in snaps:
        assert snap.timestamp >= before
        assert snap.findings == ()
        for field in dataclasses.fields(GpuSnapshot):
            assert getattr(snap, field.name) is not None, field.name
        assert snap.gpu_util_pct == 0 and snap.processes == ()
        assert 20 <= (snap.temperature_c or 0) <= 45
        assert snap.ecc_enabled is True and snap.recovery_action == 0


def test_metrics_change_gently(backend: SimulatedBackend) -> None:
    temps = [backend.poll()[0].temperature_c or 0 for _ in range(5)]
    assert max(temps) - min(temps) <= 3


def test_lost_gpu_gives_a_finding_and_no_metrics(backend: SimulatedBackend) -> None:
    assert "lost" in backend.inject(0, "lost")
    lost, fine = backend.poll()
    assert lost.has(FindingKind.GPU_LOST)
    assert lost.temperature_c is None and lost.gpu_util_pct is None
    assert not fine.findings and fine.temperature_c is not None


def test_xid_79_loses_the_gpu_for_good(backend: SimulatedBackend) -> None:
    backend.inject(1, "xid", "79")
    assert backend.poll()[1].has(FindingKind.GPU_LOST)
    ok, reason = backend.reset(1)
    assert not ok and "reboot the node" in reason
    assert backend.poll()[1].has(FindingKind.GPU_LOST)
    assert backend.resets(1) == 0


def test_nvml_hang_is_caught_by_the_deadline(backend: SimulatedBackend) -> None:
    backend.inject(0, "nvml-hang", "20")
    start = time.monotonic()
    hung, fine = backend.poll()
    elapsed = time.monotonic() - start
    # the deadline ends the poll (a loaded 2-core machine's slack on top), not the 20 s hang
    assert backend.timeout_s * 0.9 <= elapsed < backend.timeout_s + SLACK_S
    assert hung.has(FindingKind.DEADLINE) and hung.temperature_c is None
    assert not fine.findings and fine.temperature_c is not None
    again = backend.poll()[0]  # the lane is still stuck: refused at once, not queued for another deadline
    assert [(f.kind, f.call) for f in again.findings] == [(FindingKind.DEADLINE, "poll")]
    assert "lane still blocked" in again.findings[0].detail
    backend.inject(0, "clear")  # the blocked call returns, and the lane is free again (long before the 20 s)
    wait_until(lambda: not backend.poll()[0].findings, SLACK_S, "a clean poll after the clear", 0.01)


def test_nvml_hang_ends_by_itself(tmp_path: Path) -> None:
    sim = SimulatedBackend(1, tmp_path / "kmsg", timeout_s=0.2 + SLACK_S)
    start = time.monotonic()
    sim.inject(0, "nvml-hang", "0.2")
    assert not sim.poll()[0].findings  # blocked 0.2 s, well inside the deadline
    assert time.monotonic() - start >= 0.2  # the poll did wait for the hung call


def test_ecc_counters_and_reset(backend: SimulatedBackend) -> None:
    backend.inject(0, "ecc-sbe", "5")
    backend.inject(0, "ecc-dbe")
    backend.inject(0, "xid", "48")
    snap = backend.poll()[0]
    assert (snap.ecc_volatile_corrected, snap.ecc_aggregate_corrected) == (5, 5)
    assert (snap.ecc_volatile_uncorrected, snap.ecc_aggregate_uncorrected) == (2, 2)
    ok, detail = backend.reset(0)
    assert ok and "volatile ECC counters cleared" in detail
    snap = backend.poll()[0]
    assert (snap.ecc_volatile_corrected, snap.ecc_volatile_uncorrected) == (0, 0)
    assert (snap.ecc_aggregate_corrected, snap.ecc_aggregate_uncorrected) == (5, 2)
    assert backend.resets(0) == 1


def test_remap_pending_until_a_reset_applies_it(backend: SimulatedBackend) -> None:
    backend.inject(1, "remap-pending")
    assert backend.poll()[1].remap_pending is True
    assert backend.reset(1)[0]
    snap = backend.poll()[1]
    assert snap.remap_pending is False and snap.remap_uncorrectable == 1


def test_thermal_holds_and_slows_down(backend: SimulatedBackend) -> None:
    backend.inject(0, "thermal", "85")
    snap = backend.poll()[0]
    assert snap.temperature_c == 85 and snap.thermal_slowdown is False
    backend.inject(0, "thermal", "92")
    snap = backend.poll()[0]
    assert snap.temperature_c == 92 and snap.thermal_slowdown is True
    assert (snap.clock_event_reasons or 0) & 0x20
    backend.reset(0)
    snap = backend.poll()[0]
    assert (snap.temperature_c or 0) < 90 and snap.thermal_slowdown is False


def test_clear_removes_every_fault(backend: SimulatedBackend) -> None:
    for fault, value in (("lost", None), ("thermal", "99"), ("remap-pending", None), ("ecc-dbe", None)):
        backend.inject(0, fault, value)
    backend.inject(0, "clear")
    snap = backend.poll()[0]
    assert not snap.findings
    assert snap.remap_pending is False and snap.ecc_aggregate_uncorrected == 0


def test_faults_outlive_close_and_open(backend: SimulatedBackend) -> None:
    backend.inject(0, "remap-pending")
    backend.close()
    backend.open()
    assert backend.poll()[0].remap_pending is True


def test_events_follow_what_real_drivers_deliver(backend: SimulatedBackend) -> None:
    uuid0, uuid1 = (g.uuid for g in backend.inventory())
    for code in ("13", "79", "119", "120"):
        backend.inject(0, "xid", code)
    backend.inject(1, "ecc-dbe")
    events = backend.wait_events(0.1)
    assert [(e.uuid, e.event_type, e.data) for e in events] == [(uuid0, "xid", 13), (uuid1, "ecc_dbe", 0)]
    assert backend.wait_events(0.0) == []


def test_wait_events_times_out_and_wakes_on_an_event(backend: SimulatedBackend) -> None:
    start = time.monotonic()
    assert backend.wait_events(0.1) == []
    assert 0.09 <= time.monotonic() - start < 2.0  # bounded; the margin is for a loaded machine
    timer = threading.Timer(0.05, backend.inject, (1, "xid", "31"))
    timer.start()
    start = time.monotonic()
    events = backend.wait_events(30.0)
    timer.join()
    assert [e.data for e in events] == [31]
    assert time.monotonic() - start < 15.0  # woken by the event, not by its 30 s timeout


def test_inject_from_another_thread_while_polling(backend: SimulatedBackend) -> None:
    def hammer() -> None:
        for _ in range(200):
            backend.inject(1, "ecc-sbe", "1")

    thread = threading.Thread(target=hammer)
    thread.start()
    while thread.is_alive():
        assert not backend.poll()[1].findings
    thread.join()
    assert backend.poll()[1].ecc_aggregate_corrected == 200
