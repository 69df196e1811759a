"""The GPU pool (daemon/gpus.py) in-process: a real Monitor, a real EventStore
under tmp_path and a SimulatedBackend (or a small recording backend for the
real-GPU reset branch). No daemon process: the test plays the main loop,
step by step, the way Daemon.run does (drain the NVML events, poll, evaluate,
tick)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import pytest

from harness import wait_until
from gpuguard.actions.hooks import NodeHooks
from gpuguard.config import Config, MonitorConfig, ResetConfig
from gpuguard.daemon.gpus import BY_GPUGUARD, Pool
from gpuguard.daemon.monitor import Monitor
from gpuguard.events import Event, EventKind
from gpuguard.health.types import GpuState, Severity
from gpuguard.nvml.backend import Backend
from gpuguard.nvml.types import DriverInfo, GpuInfo, GpuProcess, GpuSnapshot, NvmlEvent
from gpuguard.observations import XidObservation
from gpuguard.sim.backend import SimulatedBackend
from gpuguard.store import EventStore, StoreError

WAIT_S = 10.0  # generous: the reset worker is a thread on a loaded 2-core machine


class Node:
    """A Pool wired as Daemon.start wires it, and the main loop's steps by hand."""

    def __init__(self, tmp: Path, backend: Backend, reset: ResetConfig) -> None:
        self.backend = backend
        backend.open()
        self.config = Config(monitor=MonitorConfig(poll_interval_s=0.05, nvml_timeout_s=0.5), reset=reset)
        self.monitor = Monitor(backend.inventory(), self.config.health)
        self.store = EventStore(tmp / "gpuguard.db", records=tmp / "records")
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.last_poll_at: float | None = None
        self.serve_polls: int | None = None  # poll requests still served at once, as the main loop would; None: all
        self.poll_requests = 0
        self.pool = Pool(
            backend=backend,
            monitor=self.monitor,
            store=self.store,
            config=lambda: self.config,
            record=self.record,
            hooks=NodeHooks(self.config.hooks, self.record),
            lock=self.lock,
            request_poll=self.request_poll,
            last_poll_at=lambda: self.last_poll_at,
            stopping=self.stopping,
        )
        self.uuids = [g.uuid for g in backend.inventory()]

    def close(self) -> None:
        self.stopping.set()
        self.store.close()
        self.backend.close()

    # --- the daemon's side ----------------------------------------------
    def record(self, event: Event) -> Event:
        return self.store.append(event)

    def request_poll(self) -> None:
        self.poll_requests += 1
        if self.serve_polls is None or self.serve_polls > 0:
            if self.serve_polls is not None:
                self.serve_polls -= 1
            self.poll()

    def poll(self) -> None:
        """Daemon.poll: NVML is left alone while a reset runs."""
        with self.pool.poll_lock:
            if self.pool.resetting:
                return
            snapshots = self.backend.poll()
        with self.lock:
            self.monitor.observe_snapshots(snapshots)
            self.last_poll_at = time.time()

    def drain(self) -> None:
        """The NVML events the simulator queued, as Daemon._observe_nvml_event takes them."""
        for ev in self.backend.wait_events(0.0):
            if ev.event_type == "xid":
                with self.lock:
                    event = self.monitor.observe_xid(XidObservation(xid=ev.data, timestamp=ev.timestamp, source="nvml", uuid=ev.uuid))
                if event is not None:
                    self.record(event)

    def evaluate(self, now: float | None = None) -> None:
        with self.lock:
            for event in self.monitor.evaluate(time.time() if now is None else now):
                self.record(event)

    def tick(self, now: float | None = None) -> None:
        with self.lock:
            self.pool.tick(time.time() if now is None else now, lambda _uuid: [])

    def step(self, now: float | None = None) -> None:
        """One main-loop iteration."""
        self.drain()
        self.poll()
        self.evaluate(now)
        self.tick(now)

    # --- reading back ----------------------------------------------------
    def events(self, kind: str, gpu: str | None = None) -> list[Event]:
        return self.store.events(limit=None, gpu=gpu, kinds=[kind])

    def state(self, uuid: str) -> GpuState:
        return self.pool.state(uuid)[0]

    @property
    def sim(self) -> SimulatedBackend:
        assert isinstance(self.backend, SimulatedBackend)
        return self.backend

    def fault(self, index: int, fault: str, value: str | None = None) -> None:
        """Inject, let the loop see it, and exclude the GPU as the supervisor's MOVE does."""
        self.sim.inject(index, fault, value)
        self.step()
        uuid = self.uuids[index]
        assert self.state(uuid) == GpuState.FAULTED, self.pool.state(uuid)
        self.pool.exclude(uuid, f"{fault} {value or ''}".strip())

    def reset_when_free(self, index: int) -> None:
        """The supervisor's call once the job left the GPU; waits for the worker to finish."""
        uuid = self.uuids[index]
        before = len(self.events(EventKind.GPU_RESET, uuid))
        self.pool.reset_when_free(uuid, by=f"{BY_GPUGUARD} (job j)")
        wait_until(lambda: len(self.events(EventKind.GPU_RESET, uuid)) > before, WAIT_S, "the gpu_reset event", 0.01)
        wait_until(lambda: not any(t.name.startswith("reset-") for t in threading.enumerate()), WAIT_S, "the reset worker's end", 0.01)


def sim_node(tmp: Path, **reset: Any) -> Node:
    return Node(tmp, SimulatedBackend(2, tmp / "simulated-kmsg", timeout_s=0.5), ResetConfig(**reset))


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = sim_node(tmp_path, probation_s=60.0)
    n.step()
    yield n
    n.close()


# --- the daily reset cap ------------------------------------------------------


def test_the_second_reset_of_a_day_is_refused_over_a_cap_of_one(tmp_path: Path) -> None:
    n = sim_node(tmp_path, max_per_gpu_per_day=1, probation_s=0.5)
    try:
        n.step()
        gpu0 = n.uuids[0]
        n.fault(0, "xid", "95")
        n.reset_when_free(0)
        first = n.events(EventKind.GPU_RESET, gpu0)
        assert [e.data["ok"] for e in first] == [True] and "skipped" not in first[0].data
        assert n.sim.resets(0) == 1 and n.pool.resets_today(gpu0) == 1
        n.step()
        assert n.state(gpu0) == GpuState.EXCLUDED and gpu0 in n.pool.probation  # on probation, not back yet
        n.step(time.time() + 1.0)  # past probation_s of good health
        assert n.state(gpu0) == GpuState.HEALTHY
        assert [e.data["by"] for e in n.events(EventKind.GPU_INCLUDED, gpu0)] == [BY_GPUGUARD]

        n.fault(0, "xid", "95")  # the same GPU again, the same day
        n.pool.reset_when_free(gpu0, by=f"{BY_GPUGUARD} (job j)")  # refused at once: no worker
        second = n.events(EventKind.GPU_RESET, gpu0)[-1]
        assert second.data == {"ok": False, "by": f"{BY_GPUGUARD} (job j)", "skipped": True}
        assert second.severity == Severity.ERROR and "1 reset(s) in the last 24 h" in second.message
        assert "stays excluded" in second.message
        assert n.sim.resets(0) == 1  # the hardware was not reset again
        assert n.pool.resets_today(gpu0) == 1  # a refusal is no reset
        assert gpu0 not in n.pool.probation
        for later in (1.0, 120.0, 3600.0):
            n.step(time.time() + later)
            assert n.state(gpu0) == GpuState.EXCLUDED
        assert len(n.events(EventKind.GPU_INCLUDED, gpu0)) == 1
        assert n.state(n.uuids[1]) == GpuState.HEALTHY  # the cap is per GPU
    finally:
        n.close()


def test_a_reset_more_than_a_day_ago_does_not_count_toward_the_cap(tmp_path: Path) -> None:
    n = sim_node(tmp_path, max_per_gpu_per_day=1, probation_s=60.0)
    try:
        n.step()
        gpu0 = n.uuids[0]
        old = Event(kind=EventKind.GPU_RESET, severity=Severity.INFO, gpu=gpu0, message="GPU 0 reset succeeded",
                    ts=time.time() - 86400 - 60, data={"ok": True, "by": BY_GPUGUARD})  # fmt: skip
        n.store.append(old)
        assert n.pool.resets_today(gpu0) == 0
        n.fault(0, "xid", "95")
        n.reset_when_free(0)
        assert [e.data["ok"] for e in n.events(EventKind.GPU_RESET, gpu0)] == [True, True]
        assert n.sim.resets(0) == 1
    finally:
        n.close()


# --- probation ----------------------------------------------------------------


def test_a_fault_during_probation_keeps_the_gpu_excluded(node: Node) -> None:
    gpu0 = node.uuids[0]
    node.fault(0, "xid", "95")
    node.reset_when_free(0)
    until = node.pool.probation[gpu0]
    node.step()
    assert node.state(gpu0) == GpuState.EXCLUDED and node.monitor.verdict(gpu0).state == GpuState.HEALTHY  # type: ignore[union-attr]
    assert node.events(EventKind.GPU_PROBATION_FAILED) == []

    node.sim.inject(0, "thermal", "99")  # hotter than temperature_faulted_c, while on probation
    node.step()
    failed = node.events(EventKind.GPU_PROBATION_FAILED, gpu0)
    assert len(failed) == 1 and failed[0].severity == Severity.ERROR
    assert "failed probation" in failed[0].message and "stays excluded" in failed[0].message
    assert gpu0 not in node.pool.probation
    assert node.state(gpu0) == GpuState.EXCLUDED

    node.sim.inject(0, "clear")  # healthy again: an ended probation does not come back by itself
    for later in (1.0, until - time.time() + 1.0, 3600.0):
        node.step(time.time() + later)
        assert node.monitor.verdict(gpu0).state == GpuState.HEALTHY  # type: ignore[union-attr]
        assert node.state(gpu0) == GpuState.EXCLUDED
    assert node.events(EventKind.GPU_INCLUDED, gpu0) == []
    assert len(node.events(EventKind.GPU_PROBATION_FAILED, gpu0)) == 1


def test_probation_returns_the_gpu_only_once_it_is_over(node: Node) -> None:
    gpu0 = node.uuids[0]
    node.fault(0, "xid", "48")
    node.reset_when_free(0)
    until = node.pool.probation[gpu0]
    node.step(until - 1.0)
    assert node.state(gpu0) == GpuState.EXCLUDED
    node.step(until)
    assert node.state(gpu0) == GpuState.HEALTHY and gpu0 not in node.pool.excluded
    included = node.events(EventKind.GPU_INCLUDED, gpu0)
    assert len(included) == 1 and "after its reset" in included[0].message


def test_an_operator_exclusion_during_probation_ends_it_without_a_return(node: Node) -> None:
    gpu0 = node.uuids[0]
    node.fault(0, "xid", "95")
    node.reset_when_free(0)
    node.pool.exclude(gpu0, "bad fan", by="uid 0 (pid 1)")  # the operator takes over
    node.step(time.time() + 3600.0)
    assert gpu0 not in node.pool.probation
    assert node.pool.state(gpu0) == (GpuState.EXCLUDED, "bad fan")
    assert node.events(EventKind.GPU_INCLUDED, gpu0) == []


def test_probation_is_not_judged_on_a_snapshot_from_before_the_reset(node: Node) -> None:
    gpu0 = node.uuids[0]
    node.fault(0, "ecc-dbe")  # volatile uncorrected ECC: the snapshot itself shows the fault
    # the worker's poll request before the reset is served (a fresh holder list); the one after
    # it is not yet: the main loop is between that poll and its evaluation
    node.serve_polls = 1
    node.reset_when_free(0)
    assert node.sim.resets(0) == 1 and gpu0 in node.pool.probation
    node.evaluate()
    node.tick()  # the rest of that iteration, on the snapshot polled before the reset
    node.serve_polls = None
    node.step()  # the next iteration polls the reset GPU: healthy
    assert node.monitor.verdict(gpu0).state == GpuState.HEALTHY  # type: ignore[union-attr]
    assert node.events(EventKind.GPU_PROBATION_FAILED, gpu0) == []
    assert gpu0 in node.pool.probation


# --- refusals -------------------------------------------------------------------


def test_a_reset_is_refused_while_a_process_holds_the_gpu(node: Node) -> None:
    gpu0 = node.uuids[0]
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        node.pool.occupied(gpu0, holder.pid)
        node.step()
        result = node.pool.reset(gpu0, by="uid 0 (pid 1)")
        assert not result.ok and result.detail == f"refused: processes still hold the GPU (pids {holder.pid})"
        assert node.sim.resets(0) == 0 and gpu0 not in node.pool.resetting
        assert node.events(EventKind.GPU_RESET) == []  # nothing was tried
        node.pool.vacated(gpu0, holder.pid)
        node.step()
        assert node.pool.reset(gpu0, by="uid 0 (pid 1)").ok and node.sim.resets(0) == 1
    finally:
        holder.kill()
        holder.wait()


def test_the_daemon_itself_on_the_gpu_does_not_block_a_reset(node: Node) -> None:
    gpu0 = node.uuids[0]
    node.pool.occupied(gpu0, os.getpid())  # NVML lists gpuguardd's own handle on real GPUs
    node.step()
    assert os.getpid() in {p.pid for p in node.monitor.tracks[gpu0].snapshot.processes}  # type: ignore[union-attr]
    node.sim.detach(gpu0, os.getpid())  # the simulator refuses a busy GPU of its own accord
    assert node.pool.reset(gpu0, by="uid 0 (pid 1)").ok


# --- the real-GPU reset branch: NVML closed around the command --------------------


class RecordingBackend:
    """A `Backend` of real GPUs (no simulator) that records open/close and what the
    pool was doing then, and writes its NVML state where the reset command can read it."""

    kind: Literal["nvml", "simulated"] = "nvml"
    simulator = None

    def __init__(self, state_file: Path, count: int = 2) -> None:
        self.state_file = state_file
        self.calls: list[str] = []
        self.pool: Pool | None = None
        self.resetting_at_close: list[set[str]] = []
        self.processes: dict[int, tuple[GpuProcess, ...]] = {}
        self._open = False
        self._gpus = [GpuInfo(i, f"GPU-{i:08d}-rec0-0000-0000-000000000000", f"00000000:{0x18 + i:02X}:00.0", "H200", None, None) for i in range(count)]
        state_file.write_text("never opened")

    def open(self) -> None:
        self.calls.append("open")
        self._open = True
        self.state_file.write_text("open")

    def close(self) -> None:
        self.calls.append("close")
        if self.pool is not None:
            self.resetting_at_close.append(set(self.pool.resetting))
        self._open = False
        self.state_file.write_text("closed")

    def driver_info(self) -> DriverInfo:
        return DriverInfo("570.124.06", "12.8", "12.570.124.06")

    def inventory(self) -> list[GpuInfo]:
        return list(self._gpus)

    def poll(self) -> list[GpuSnapshot]:
        if not self._open:
            raise AssertionError("poll while NVML is closed")
        self.calls.append("poll")
        now = time.time()
        return [GpuSnapshot(index=g.index, uuid=g.uuid, timestamp=now, temperature_c=40, processes=self.processes.get(g.index, ())) for g in self._gpus]

    def wait_events(self, timeout_s: float) -> list[NvmlEvent]:
        return []


def reset_command(seen: Path, state_file: Path, code: str) -> tuple[str, ...]:
    """A reset command that notes NVML's state and the argv it got, then runs `code`."""
    script = (
        "import pathlib, sys, time\n"
        f"pathlib.Path({str(seen)!r}).open('a').write(pathlib.Path({str(state_file)!r}).read_text() + ' ' + ' '.join(sys.argv[1:]) + '\\n')\n"
        + code
    )
    return (sys.executable, "-c", script, "{uuid}", "{index}", "{pci_bus_id}")


@pytest.fixture
def real(tmp_path: Path) -> Iterator[tuple[Node, RecordingBackend, Path]]:
    backend = RecordingBackend(tmp_path / "nvml-state")
    n = Node(tmp_path, backend, ResetConfig(timeout_s=1.0))
    backend.pool = n.pool
    n.step()
    yield n, backend, tmp_path / "seen"
    n.close()


def _reset_with(n: Node, backend: RecordingBackend, seen: Path, code: str, **reset: Any) -> tuple[Any, list[str]]:
    n.config = replace(n.config, reset=replace(n.config.reset, command=reset_command(seen, backend.state_file, code), **reset))
    backend.calls.clear()
    result = n.pool.reset(n.uuids[1], by="uid 0 (pid 1)")
    return result, [c for c in backend.calls if c != "poll"]


def test_real_gpus_close_nvml_for_the_reset_command_and_reopen_it(real: tuple[Node, RecordingBackend, Path]) -> None:
    n, backend, seen = real
    assert backend.simulator is None
    _: Backend = backend
    result, calls = _reset_with(n, backend, seen, "print('GPU 00000000:19:00.0 was reset')")
    assert result.ok and result.detail == "GPU 00000000:19:00.0 was reset"
    assert calls == ["close", "open"]
    assert backend.resetting_at_close == [{n.uuids[1]}]  # polls and event waits leave NVML alone meanwhile
    info = n.pool.info(n.uuids[1])
    assert seen.read_text() == f"closed {info.uuid} 1 {info.pci_bus_id}\n"
    assert backend.state_file.read_text() == "open" and not n.pool.resetting
    assert "poll" in backend.calls  # the pool asked for a fresh poll afterwards, and it ran on the reopened NVML
    event = n.events(EventKind.GPU_RESET, n.uuids[1])[-1]
    assert event.data["ok"] is True and event.data["argv"][-3:] == [info.uuid, "1", info.pci_bus_id]


@pytest.mark.parametrize(
    ("code", "reset", "detail"),
    [
        ("sys.stderr.write('GPU is busy\\n'); sys.exit(3)", {}, "reset command exited 3: GPU is busy"),
        ("time.sleep(30)", {}, "reset command did not finish within 1s"),
    ],
    ids=["fails", "times-out"],
)
def test_nvml_is_reopened_when_the_reset_command_fails(
    real: tuple[Node, RecordingBackend, Path], code: str, reset: dict[str, Any], detail: str
) -> None:
    n, backend, seen = real
    result, calls = _reset_with(n, backend, seen, code, **reset)
    assert not result.ok and result.detail == detail
    assert calls == ["close", "open"]
    assert seen.read_text().startswith("closed ")
    assert backend.state_file.read_text() == "open" and not n.pool.resetting
    event = n.events(EventKind.GPU_RESET, n.uuids[1])[-1]
    assert event.data["ok"] is False and event.severity == Severity.ERROR and detail in event.message
    n.step()  # the loop polls again once the reset is over
    assert n.state(n.uuids[1]) == GpuState.HEALTHY


def test_nvml_is_reopened_when_the_reset_command_cannot_start(real: tuple[Node, RecordingBackend, Path]) -> None:
    n, backend, _seen = real
    n.config = replace(n.config, reset=replace(n.config.reset, command=("/nonexistent/gpu-reset", "{uuid}")))
    backend.calls.clear()
    result = n.pool.reset(n.uuids[0], by="uid 0 (pid 1)")
    assert not result.ok and result.detail == "reset command not found: /nonexistent/gpu-reset"
    assert [c for c in backend.calls if c != "poll"] == ["close", "open"]
    assert backend.state_file.read_text() == "open"


def test_real_gpus_refuse_a_reset_before_closing_nvml_while_held(real: tuple[Node, RecordingBackend, Path]) -> None:
    n, backend, seen = real
    backend.processes[1] = (GpuProcess(os.getpid(), None), GpuProcess(4242, 1 << 30))  # our own pid is never a holder
    n.step()
    result, calls = _reset_with(n, backend, seen, "pass")
    assert not result.ok and result.detail == "refused: processes still hold the GPU (pids 4242)"
    assert calls == [] and not seen.exists()


def test_a_second_reset_of_a_gpu_is_refused_while_the_first_runs(real: tuple[Node, RecordingBackend, Path]) -> None:
    n, backend, seen = real
    release = backend.state_file.with_name("release")
    code = f"while not pathlib.Path({str(release)!r}).exists(): time.sleep(0.02)"
    n.config = replace(n.config, reset=replace(n.config.reset, command=reset_command(seen, backend.state_file, code), timeout_s=30.0))
    gpu1 = n.uuids[1]
    results: list[Any] = []
    first = threading.Thread(target=lambda: results.append(n.pool.reset(gpu1, by="uid 0 (pid 1)")))
    backend.calls.clear()
    first.start()
    try:
        wait_until(seen.exists, WAIT_S, "the first reset's command to run", 0.01)
        assert n.pool.state(gpu1) == (GpuState.RESETTING, "reset in progress")
        second = n.pool.reset(gpu1, by="uid 0 (pid 2)")
        assert not second.ok and second.detail == "a reset of this GPU is already in progress"
        n.step()  # the loop keeps going meanwhile, and leaves NVML alone
        assert backend.calls == ["close"] and backend.state_file.read_text() == "closed"
    finally:
        release.touch()
        first.join(timeout=WAIT_S)
    assert not first.is_alive() and [r.ok for r in results] == [True]
    assert n.pool.state(gpu1)[0] == GpuState.HEALTHY
    assert [e.data["ok"] for e in n.events(EventKind.GPU_RESET, gpu1)] == [True]  # the refusal is no reset event


# --- a store that cannot save -------------------------------------------------------


def test_an_exclusion_holds_when_the_store_cannot_save_it_and_is_saved_later(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk must not drop a fault decision (nor end the daemon): the quarantine holds
    in memory at once, and the store gets it once it can."""
    gpu1 = node.uuids[1]
    real = node.store.exclude

    def full(*args: Any, **kw: Any) -> None:
        raise StoreError("database or disk is full")

    monkeypatch.setattr(node.store, "exclude", full)
    node.pool.exclude(gpu1, "Xid 95")
    assert node.state(gpu1) == GpuState.EXCLUDED and gpu1 not in node.store.excluded()
    node.step()  # still full: retried, no exception
    monkeypatch.setattr(node.store, "exclude", real)
    node.step()
    assert node.store.excluded()[gpu1].reason == "Xid 95"


def test_an_include_on_a_full_disk_does_not_end_the_daemon(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    gpu1 = node.uuids[1]
    node.pool.exclude(gpu1, "Xid 95")

    def full(*args: Any, **kw: Any) -> bool:
        raise StoreError("database or disk is full")

    monkeypatch.setattr(node.store, "include", full)
    assert node.pool.include(gpu1, by="uid 0 (pid 1)")
    assert node.state(gpu1) == GpuState.HEALTHY
    node.step()
    monkeypatch.undo()
    node.step()
    assert gpu1 not in node.store.excluded()


def test_exclusions_from_the_socket_and_the_main_loop_at_once_never_raise(node: Node) -> None:
    """The control socket's threads and the main loop's tick both save quarantine changes
    (a CI run caught the daemon dying of a KeyError when they met)."""
    gpu1 = node.uuids[1]
    errors: list[BaseException] = []
    stop = threading.Event()

    def socket_side() -> None:
        try:
            while not stop.is_set():
                node.pool.exclude(gpu1, "by hand", by="uid 0 (pid 1)")
                node.pool.include(gpu1, by="uid 0 (pid 1)")
        except BaseException as exc:  # noqa: BLE001 - the test reports whatever it was
            errors.append(exc)

    threads = [threading.Thread(target=socket_side) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            node.pool._unsaved.setdefault(gpu1, None)  # as a change the store refused would leave it
            node.tick()
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert errors == [] and not any(t.is_alive() for t in threads)
