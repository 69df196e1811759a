"""A real gpuguardd --simulate 2: a process that escaped its job (new session, reparented
away) dies at `gpuguardctl stop`, also when the daemon was SIGKILLed and started again."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from harness import DaemonProc, gone, running_daemon, wait_until
from gpuguard.supervisor import cgroup

from .escaping_job import escaping_job

FAST = "[jobs]\ncheckpoint_grace_s = 1\nstop_timeout_s = 0.5\n"


pytestmark = [pytest.mark.e2e, pytest.mark.root]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProc]:
    with running_daemon(tmp_path, gpus=2, extra_config=FAST) as d:
        yield d


def test_an_escapee_dies_at_stop_after_a_daemon_restart(daemon: DaemonProc, needs_cgroup: None) -> None:
    d, name = daemon, "escaper"
    status = d.state_dir / "jobs" / name / "exit-status"  # the job's cgroup is found by it and the name
    work = d.tmp / "work"
    work.mkdir()
    script, pidfile = escaping_job(work)
    (work / "job.py").write_text(script)
    d.ctl("run", "--name", name, "--workdir", str(work), "--", sys.executable, str(work / "job.py"))
    try:
        log = d.state_dir / "jobs" / name / "output.log"
        wait_until(lambda: log.exists() and "ready" in log.read_text(), 10, "the escapee reparented away")
        escapee = int(pidfile.read_text())
        wrapper = int(d.job(name)["pid"])
        assert psutil.Process(escapee).ppid() != wrapper and os.getsid(escapee) != wrapper

        d.stop(signal.SIGKILL)
        assert not gone(escapee) and not gone(wrapper)
        d.start()
        assert d.job(name)["state"] == "running"
        assert cgroup.find(name, status) is not None

        d.ctl("stop", name)
        d.wait_for(lambda s: d.job(name)["state"] == "stopped", timeout_s=10, what="the job stopped")
        wait_until(lambda: gone(escapee), 5, "the escapee's end")
        assert gone(wrapper)
        # the wrapper recorded the exit: the job's main process ignores SIGTERM and was SIGKILLed
        assert d.job(name)["exit_code"] == -signal.SIGKILL
        assert cgroup.find(name, status) is None  # removed once empty
    finally:  # a failed test leaves no job behind (jobs outlive their daemon by design)
        left = cgroup.find(name, status)
        if left is not None:
            left.kill()
            wait_until(left.remove, 5, "the job's cgroup emptied")
