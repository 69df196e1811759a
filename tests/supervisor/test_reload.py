"""SIGHUP reaches the supervisor: its hang limits and stop timings are the
reloaded ones, while the checkpoint signal, which running jobs were told in
their environment, waits for a restart."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from harness import DaemonProc, running_daemon, wait_until

pytestmark = pytest.mark.e2e

JOB = """
import os, pathlib, time
pathlib.Path(os.environ["GPUGUARD_HEARTBEAT"]).touch()  # one beat, then idle: hung once the limit is low
time.sleep(600)
"""


def _heartbeat(d: DaemonProc) -> float | None:
    """When the job's heartbeat file was last touched (GPUGUARD_HEARTBEAT)."""
    try:
        return (d.socket.parent / "jobs" / "j" / "heartbeat").stat().st_mtime
    except FileNotFoundError:
        return None


def test_sighup_changes_the_hang_limit_of_a_running_job_and_keeps_its_signal(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(JOB)
    config = "hang_timeout_s = 600.0\n[jobs]\ncheckpoint_grace_s = 0.5\nstop_timeout_s = 0.5\n"
    with running_daemon(tmp_path, extra_config=config, stop_jobs=["j"]) as d:
        d.ctl("run", "--name", "j", "--workdir", str(tmp_path), "--", sys.executable, str(script))
        d.wait_for(lambda s: any(j["name"] == "j" and j["state"] == "running" for j in s["jobs"]), what="j running")
        beat = wait_until(lambda: _heartbeat(d), 10, "the job's one heartbeat")
        d.polls_after(beat + 1.5, polls=2)  # the daemon looked at it idle past the new limit: only the old one holds it
        assert "hang" not in d.kinds(job="j")
        text = d.config.read_text().replace("hang_timeout_s = 600.0", "hang_timeout_s = 1.0")
        d.config.write_text(text.replace("[jobs]\n", '[jobs]\ncheckpoint_signal = "SIGUSR2"\n'))
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "hang" in d.kinds(job="j"), 15, "the hang seen under the reloaded limit")
        log = d.log.read_text()
        assert "config_reloaded" in log and "jobs.checkpoint_signal" in log  # named as needing a restart
        attempt2 = wait_until(
            lambda: next((j for j in d.status()["jobs"] if j["name"] == "j" and j["attempt"] == 2), None),
            15, "the restarted attempt",
        )  # fmt: skip
        assert attempt2["name"] == "j"
