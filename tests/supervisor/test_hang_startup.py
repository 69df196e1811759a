"""Hang detection around a trainer's start-up (found on an H200: a restarted
trainer importing torch sat idle past hang_timeout_s and was killed as hung,
because the previous attempt's heartbeat file made it look like a heartbeating
job that had stopped)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from harness import DaemonProc

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


def _events(proc: DaemonProc) -> list[dict]:
    return json.loads(proc.ctl("events", "--json", "--job", "j", "--limit", "200").stdout)


def _wait_final(proc: DaemonProc, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = next(j for j in proc.status()["jobs"] if j["name"] == "j")
        if job["state"] in ("succeeded", "failed", "stopped"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job did not finish: {job}")


def test_slow_start_after_restart_is_not_a_hang(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(JOB)
    proc = DaemonProc(tmp_path, extra_config="hang_timeout_s = 1.0\nhang_startup_timeout_s = 30.0\n")
    proc.start()
    try:
        proc.ctl("run", "--name", "j", "--workdir", str(tmp_path), "--", sys.executable, str(script), "3")
        time.sleep(1.0)
        proc.ctl("inject", "0", "xid", "13")  # restart the app: attempt 2 starts slowly
        job = _wait_final(proc, 30)
        assert job["state"] == "succeeded" and job["attempt"] == 2
        assert not [e for e in _events(proc) if e["kind"] == "hang"]
    finally:
        proc.stop()


def test_start_up_that_never_progresses_is_a_hang(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text("import time\ntime.sleep(60)\n")
    proc = DaemonProc(
        tmp_path,
        extra_config="hang_timeout_s = 1.0\nhang_startup_timeout_s = 2.0\n[jobs]\ncheckpoint_grace_s = 0.5\nstop_timeout_s = 0.5\nmax_restarts = 0\n",
    )
    proc.start()
    try:
        proc.ctl("run", "--name", "j", "--workdir", str(tmp_path), "--", sys.executable, str(script))
        deadline = time.monotonic() + 20
        while not [e for e in _events(proc) if e["kind"] == "hang"]:
            assert time.monotonic() < deadline, "the stuck start-up was never called a hang"
            time.sleep(0.1)
        hang = next(e for e in _events(proc) if e["kind"] == "hang")
        assert "limit 2s" in hang["message"]
    finally:
        proc.ctl("stop", "j", check=False)
        proc.stop()
