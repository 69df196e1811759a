"""Processes on a simulated GPU. Every process here is one the test starts and kills itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

from gpuguard.nvml.types import GpuSnapshot
from gpuguard.sim.backend import SimulatedBackend

BUSY = "while True: pass"


@pytest.fixture
def busy() -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen([sys.executable, "-c", BUSY])
    yield child
    child.kill()
    child.wait()


def settled(backend: SimulatedBackend, index: int, ok, polls: int = 8) -> GpuSnapshot:
    """Poll until ok(snapshot): cpu_percent measures from one poll to the next."""
    snap = backend.poll()[index]
    for _ in range(polls):
        time.sleep(0.15)
        snap = backend.poll()[index]
        if ok(snap):
            break
    return snap


def test_inject_attach_lists_a_process_and_detach_removes_it(backend: SimulatedBackend, busy) -> None:
    assert f"pid {busy.pid} listed" in backend.inject(1, "attach", str(busy.pid))
    assert [p.pid for p in backend.poll()[1].processes] == [busy.pid]
    assert backend.poll()[0].processes == ()
    backend.inject(1, "detach", str(busy.pid))
    assert backend.poll()[1].processes == ()
    with pytest.raises(ValueError, match="attach: no process"):
        backend.inject(1, "attach", str(_unused_pid()))


def _unused_pid() -> int:
    pid = 4_194_000
    while psutil.pid_exists(pid):
        pid += 1
    return pid


def test_attached_process_shows_and_drives_utilisation(backend: SimulatedBackend, busy) -> None:
    backend.attach(backend.inventory()[0].uuid, busy.pid)
    snap = settled(backend, 0, lambda s: (s.gpu_util_pct or 0) > 20)
    assert [p.pid for p in snap.processes] == [busy.pid]
    assert (snap.processes[0].used_memory_bytes or 0) > 0
    assert (snap.gpu_util_pct or 0) > 20
    assert (snap.memory_used_bytes or 0) > (snap.processes[0].used_memory_bytes or 0)
    assert backend.poll()[1].processes == ()  # only on the GPU it was attached to


def test_stopped_process_leaves_the_gpu_idle(backend: SimulatedBackend, busy) -> None:
    backend.attach(backend.inventory()[0].uuid, busy.pid)
    settled(backend, 0, lambda s: (s.gpu_util_pct or 0) > 20)
    busy.send_signal(signal.SIGSTOP)
    try:
        snap = settled(backend, 0, lambda s: (s.gpu_util_pct or 0) <= 2)
    finally:
        busy.send_signal(signal.SIGCONT)
    assert (snap.gpu_util_pct or 0) <= 2
    assert [p.pid for p in snap.processes] == [busy.pid]


def test_hang_fault_keeps_the_process_listed_at_zero(backend: SimulatedBackend, busy) -> None:
    backend.attach(backend.inventory()[1].uuid, busy.pid)
    backend.inject(1, "hang")
    snap = settled(backend, 1, lambda s: bool(s.processes))
    assert snap.gpu_util_pct == 0 and [p.pid for p in snap.processes] == [busy.pid]
    ok, reason = backend.reset(1)  # a real reset refuses while a process holds the GPU
    assert not ok and f"in use by process {busy.pid}" in reason
    backend.detach(backend.inventory()[1].uuid, busy.pid)
    assert backend.reset(1)[0]
    assert backend.poll()[1].processes == ()


def test_descendants_are_listed_and_dead_pids_drop_out(backend: SimulatedBackend) -> None:
    spawner = (
        "import subprocess, sys, time;"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); time.sleep(30)"
    )
    parent = subprocess.Popen([sys.executable, "-c", spawner], start_new_session=True)
    try:
        backend.attach(backend.inventory()[0].uuid, parent.pid)
        snap = settled(backend, 0, lambda s: len(s.processes) == 2)
        pids = [p.pid for p in snap.processes]
        assert pids[0] == parent.pid and len(pids) == 2
        assert psutil.Process(pids[1]).ppid() == parent.pid
    finally:
        os.killpg(parent.pid, signal.SIGKILL)  # its own session: only what this test started
    # not reaped yet: a zombie is no longer on the GPU
    snap = settled(backend, 0, lambda s: not s.processes)
    parent.wait()
    assert snap.processes == () and snap.gpu_util_pct == 0
