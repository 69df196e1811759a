"""State that cannot be lost: a real gpuguardd whose database is overwritten
while it is down finds its running job and its quarantine list again in the
records files, and says so with a critical event."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import psutil

from harness import DaemonProc, gone, wait_until

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def job(d: DaemonProc, name: str) -> dict[str, Any]:
    jobs = d.status()["jobs"]
    found = [j for j in jobs if j["name"] == name]
    assert found, f"the daemon does not know job {name}: {jobs}"
    return found[0]


def test_an_overwritten_database_is_rebuilt_from_the_records(tmp_path: Path) -> None:
    d = DaemonProc(tmp_path)
    d.start()
    pid = None
    try:
        d.ctl("run", "--name", "keep", "--workdir", str(tmp_path), "--", *SLEEPER)
        d.wait_for(lambda s: s["jobs"] and s["jobs"][0]["state"] == "running", timeout_s=10, what="keep running")
        pid = job(d, "keep")["pid"]
        held = job(d, "keep")["gpus"]
        spare = next(g for g in d.status()["gpus"] if g["uuid"] not in held)
        d.ctl("exclude", str(spare["index"]), "--reason", "bad fan")
        d.wait_for(lambda s: s["gpus"][spare["index"]]["state"] == "excluded", what="the spare GPU excluded")
        assert d.stop() == 0
        assert not gone(pid)  # a daemon's stop leaves its jobs running

        db = d.state_dir / "gpuguard.db"
        with open(db, "r+b") as f:
            f.write(b"\xa5" * 100)
        d.start()

        kept = job(d, "keep")
        assert kept["state"] == "running" and kept["pid"] == pid and kept["gpus"] == held
        assert d.gpu(spare["index"])["state"] == "excluded"
        events = json.loads(d.ctl("events", "--json", "--limit", "1000").stdout)
        [told] = [e for e in events if e["kind"] == "state_rebuilt"]
        assert told["severity"] == "critical" and told["jobs"] == ["keep"] and told["gpus"] == [spare["uuid"]]
        assert "corrupt" in told["message"] and Path(told["moved_to"]).exists()
        assert any(e["kind"] == "job_adopted" and e["job"] == "keep" for e in events)

        d.ctl("stop", "keep")
        d.wait_for(lambda s: s["jobs"][0]["state"] == "stopped", timeout_s=15, what="keep stopped")
        wait_until(lambda: gone(pid), 5, "the job's end")
    finally:
        d.stop()
        if pid is not None and not gone(pid):
            for proc in psutil.Process(pid).children(recursive=True) + [psutil.Process(pid)]:
                proc.kill()
