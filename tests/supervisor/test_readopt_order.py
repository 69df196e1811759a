"""A daemon restart that finds one job ended (exit 75, to be restarted) and
another still running must not start the first on the second's GPU (found by
the chaos run: records were re-adopted one by one, so a GPU of a job not read
yet looked free)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from harness import DaemonProc, running_daemon, wait_until
from gpuguard.store import EventStore

pytestmark = pytest.mark.e2e


def test_restarted_job_waits_for_a_gpu_a_later_job_still_holds(tmp_path: Path) -> None:
    with running_daemon(tmp_path / "probe") as probe:  # only to learn the simulated GPUs' UUIDs
        gpu0, gpu1 = probe.gpu(0)["uuid"], probe.gpu(1)["uuid"]

    proc = DaemonProc(tmp_path)
    proc.state_dir.mkdir(parents=True, mode=0o711)
    (proc.state_dir / "jobs" / "a").mkdir(parents=True)
    (proc.state_dir / "jobs" / "a" / "exit-status").write_text("75\n")  # "a" saved and exited while no daemon ran
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        store = EventStore(proc.state_dir / "gpuguard.db")
        common = {"command": [sys.executable, "-c", "import time; time.sleep(60)"], "workdir": str(tmp_path),
                  "env": {}, "user": None, "gpus_wanted": 1, "source": "cli", "attempt": 1}
        dead = psutil.Process(live.pid).create_time() - 100  # no process was created then: "a" is gone
        store.put_job("a", {**common, "name": "a", "state": "running", "gpus": [gpu0], "pid": 999999, "start_time": dead})
        store.put_job("b", {**common, "name": "b", "state": "running", "gpus": [gpu1], "pid": live.pid,
                            "start_time": psutil.Process(live.pid).create_time()})  # fmt: skip
        store.exclude(gpu0, "bad", by="test")  # "a" must move: the only other GPU is b's
        store.close()
        proc.start()
        try:
            wait_until(lambda: {"job_adopted", "job_waiting"} <= set(proc.kinds()), 10, "b adopted and a waiting")
            proc.polls_after(time.time())  # ticks since then: none of them put "a" on b's GPU
            jobs = {j["name"]: j for j in proc.status()["jobs"]}
            assert jobs["b"]["state"] == "running" and jobs["b"]["gpus"] == [gpu1]
            assert jobs["a"]["state"] == "waiting", jobs["a"]
            assert gpu1 not in jobs["a"]["gpus"]
            events = proc.events()
            assert [e["job"] for e in events if e["kind"] == "job_adopted"] == ["b"]
            assert not [e for e in events if e["kind"] in ("job_started", "job_restarted") and e["job"] == "a"]
        finally:
            proc.ctl("stop", "a", check=False)
            proc.ctl("stop", "b", check=False)
            proc.stop()
    finally:
        live.kill()
        live.wait()
