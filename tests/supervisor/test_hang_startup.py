"""Hang detection around a trainer's start-up (found on an H200: a restarted
trainer importing torch sat idle past hang_timeout_s and was killed as hung,
because the previous attempt's heartbeat file made it look like a heartbeating
job that had stopped)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from harness import DaemonProc, running_daemon, wait_until

pytestmark = pytest.mark.e2e

JOB = """
import os, pathlib, signal, sys, time
hb = pathlib.Path(os.environ["GPUGUARD_HEARTBEAT"])
if os.environ["GPUGUARD_ATTEMPT"] == "1":
    signal.signal(signal.SIGUSR1, lambda *_: sys.exit(75))
    while True:
        hb.touch()
        time.sleep(0.1)
time.sleep(float(sys.argv[1]))  # a slow, idle start-up: no CPU, no heartbeat
for _ in range(5):
    hb.touch()
    time.sleep(0.1)
"""


def _wait_final(proc: DaemonProc, timeout_s: float) -> dict:
    return wait_until(
        lambda: (job := proc.job("j"))["state"] in ("succeeded", "failed", "stopped") and job, timeout_s, "job j to finish"
    )  # fmt: skip


def test_slow_start_after_restart_is_not_a_hang(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(JOB)
    with running_daemon(tmp_path, extra_config="hang_timeout_s = 1.0\nhang_startup_timeout_s = 30.0\n") as proc:
        proc.ctl("run", "--name", "j", "--workdir", str(tmp_path), "--", sys.executable, str(script), "3")
        heartbeat = proc.socket.parent / "jobs" / "j" / "heartbeat"
        wait_until(heartbeat.exists, 10, "attempt 1 heartbeating")  # a heartbeat file the next attempt finds
        proc.ctl("inject", "0", "xid", "13")  # restart the app: attempt 2 starts slowly
        job = _wait_final(proc, 30)
        assert job["state"] == "succeeded" and job["attempt"] == 2
        assert proc.events("hang", job="j") == []


def test_start_up_that_never_progresses_is_a_hang(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text("import time\ntime.sleep(60)\n")
    config = "hang_timeout_s = 1.0\nhang_startup_timeout_s = 2.0\n[jobs]\ncheckpoint_grace_s = 0.5\nstop_timeout_s = 0.5\nmax_restarts = 0\n"
    with running_daemon(tmp_path, extra_config=config, stop_jobs=["j"]) as proc:
        proc.ctl("run", "--name", "j", "--workdir", str(tmp_path), "--", sys.executable, str(script))
        hang = wait_until(lambda: proc.events("hang", job="j"), 20, "the stuck start-up called a hang")[0]
        assert "limit 2s" in hang["message"]
