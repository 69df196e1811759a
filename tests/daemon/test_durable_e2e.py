"""State that cannot be lost: a real gpuguardd whose database is overwritten
while it is down finds its running job and its quarantine list again in the
records files, and says so with a critical event."""

from __future__ import annotations

import sys
from pathlib import Path

import psutil
import pytest

from harness import gone, running_daemon, wait_until

pytestmark = pytest.mark.e2e

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def test_an_overwritten_database_is_rebuilt_from_the_records(tmp_path: Path) -> None:
    pid = None
    try:
        with running_daemon(tmp_path) as d:
            d.ctl("run", "--name", "keep", "--workdir", str(tmp_path), "--", *SLEEPER)
            d.wait_for(lambda s: s["jobs"] and s["jobs"][0]["state"] == "running", timeout_s=10, what="keep running")
            pid = d.job("keep")["pid"]
            held = d.job("keep")["gpus"]
            spare = next(g for g in d.status()["gpus"] if g["uuid"] not in held)
            d.ctl("exclude", str(spare["index"]), "--reason", "bad fan")
            d.wait_for(lambda s: s["gpus"][spare["index"]]["state"] == "excluded", what="the spare GPU excluded")
            assert d.stop() == 0
            assert not gone(pid)  # a daemon's stop leaves its jobs running

            db = d.state_dir / "gpuguard.db"
            with open(db, "r+b") as f:
                f.write(b"\xa5" * 100)
            d.start()

            kept = d.job("keep")
            assert kept["state"] == "running" and kept["pid"] == pid and kept["gpus"] == held
            assert d.gpu(spare["index"])["state"] == "excluded"
            events = d.events()
            [told] = [e for e in events if e["kind"] == "state_rebuilt"]
            assert told["severity"] == "critical" and told["jobs"] == ["keep"] and told["gpus"] == [spare["uuid"]]
            assert "corrupt" in told["message"] and Path(told["moved_to"]).exists()
            assert any(e["kind"] == "job_adopted" and e["job"] == "keep" for e in events)

            d.ctl("stop", "keep")
            d.wait_for(lambda s: s["jobs"][0]["state"] == "stopped", timeout_s=15, what="keep stopped")
            wait_until(lambda: gone(pid), 5, "the job's end")
    finally:
        if pid is not None and not gone(pid):
            for proc in psutil.Process(pid).children(recursive=True) + [psutil.Process(pid)]:
                proc.kill()
