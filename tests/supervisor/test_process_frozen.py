"""A stopped (SIGSTOPped) job can answer neither the checkpoint signal nor
SIGTERM: stop() SIGKILLs it at once instead of waiting out the grace and the
SIGTERM timeout (the benchmark of a hung trainer showed the wait)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from harness import wait_until
from gpuguard.supervisor.process import spawn

pytestmark = pytest.mark.e2e

SCRIPT = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGUSR1, lambda *_: sys.exit(75))\n"
    "print('ready', flush=True)\n"
    "while True: time.sleep(0.05)\n"
)


def _job(tmp_path: Path):
    log = tmp_path / "log"
    proc = spawn([sys.executable, "-c", SCRIPT], env=dict(os.environ), cwd=tmp_path, user=None, log_path=log)
    wait_until(lambda: log.exists() and "ready" in log.read_text(), 10, "the job up, its handler installed")
    assert [p for p in proc.tree() if p.pid != proc.pid], "the job's process is not in the tree"
    return proc


def test_stopped_job_is_killed_without_waiting_for_the_grace(tmp_path: Path) -> None:
    proc = _job(tmp_path)
    for child in proc.tree():
        if child.pid != proc.pid:
            child.send_signal(signal.SIGSTOP)
    started = time.monotonic()
    result = proc.stop(signal.SIGUSR1, grace_s=20.0, term_timeout_s=20.0)
    assert time.monotonic() - started < 5.0
    assert result.phase == "kill" and not result.survivors
    assert result.returncode == -signal.SIGKILL


def test_running_job_still_gets_its_grace_and_checkpoints(tmp_path: Path) -> None:
    proc = _job(tmp_path)
    result = proc.stop(signal.SIGUSR1, grace_s=20.0, term_timeout_s=20.0)
    assert result.phase == "checkpoint" and result.returncode == 75
    assert not [p for p in result.survivors if psutil.pid_exists(p)]
