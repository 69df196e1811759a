"""State an operator can rely on: one daemon per state dir, and `include` as
the operator's word (it clears what gpuguard remembered about the GPU)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from harness import BIN, DaemonProc, running_daemon

pytestmark = pytest.mark.e2e


def test_a_second_daemon_on_the_same_state_dir_exits_2_naming_the_holder(daemon: DaemonProc, tmp_path: Path) -> None:
    assert daemon.proc is not None
    other_socket = tmp_path / "run2" / "gpuguard.sock"
    other_socket.parent.mkdir()
    second = subprocess.run(
        [str(BIN / "gpuguardd"), "--simulate", "2", "--config", str(daemon.config),
         "--state-dir", str(daemon.state_dir), "--socket", str(other_socket)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert second.returncode == 2, second.stderr
    assert f"in use by another gpuguardd (pid {daemon.proc.pid})" in second.stderr
    assert not other_socket.exists()
    assert daemon.ctl("check").returncode == 0  # the first one is untouched


def test_the_lock_is_released_when_the_daemon_stops(tmp_path: Path) -> None:
    with running_daemon(tmp_path) as first:
        assert first.stop() == 0
    with running_daemon(tmp_path) as second:  # would exit 2 if the lock outlived its holder
        assert second.stop() == 0


def test_include_clears_a_fault_gpuguard_remembered(daemon: DaemonProc) -> None:
    """Xid 54 asks for a hardware inspection: a reset does not clear it, the operator's include does."""
    daemon.ctl("inject", "1", "xid", "54")
    daemon.wait_for(lambda s: s["gpus"][1]["state"] == "faulted", what="GPU 1 faulted by Xid 54")
    daemon.ctl("reset", "1")
    assert daemon.gpu(1)["state"] == "faulted"  # the reset does not answer an inspection
    reply = daemon.ctl("include", "1", check=False)
    assert reply.returncode == 0, reply.stderr
    daemon.wait_for(lambda s: s["gpus"][1]["state"] == "healthy", what="GPU 1 healthy after include")
    included = daemon.events("gpu_included", gpu="1")
    assert included and "uid 0" in included[-1]["message"]


def test_include_does_not_clear_what_nvml_reports_now(daemon: DaemonProc) -> None:
    """Only remembered faults are forgotten: a GPU NVML still reports lost stays faulted."""
    daemon.ctl("inject", "1", "lost")
    daemon.wait_for(lambda s: s["gpus"][1]["state"] == "faulted", what="GPU 1 lost")
    daemon.ctl("include", "1", check=False)
    daemon.ctl("inject", "0", "xid", "13")  # a marker: once it is seen, GPU 1 was evaluated after the include
    daemon.wait_for(lambda s: any(f["xid"] == 13 for f in s["gpus"][0]["findings"]), what="the marker Xid")
    assert daemon.gpu(1)["state"] == "faulted"
