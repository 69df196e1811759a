"""A job that cannot answer the checkpoint signal is not sent it: SIGUSR1's
default action would kill it before it saved anything (CONTRACT.md, the
checkpoint handshake). It gets SIGTERM at once and a checkpoint_unsupported
event says so; a job that handles the signal still gets it, with the fault
note (gpuguard/fault.py) written before it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from harness import DaemonProc, running_daemon

pytestmark = pytest.mark.e2e

FAST = "[jobs]\ncheckpoint_grace_s = 5\nstop_timeout_s = 2\n"
NO_HANDLER = "import time\nopen('started', 'w').close()\ntime.sleep(120)\n"
HANDLER = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGUSR1, lambda *_: sys.exit(75))\n"
    "open('started', 'w').close()\n"
    "time.sleep(120)\n"
)


def start(d: DaemonProc, tmp_path: Path, name: str, script: str) -> None:
    work = tmp_path / name
    work.mkdir()
    (work / "job.py").write_text(script)
    d.ctl("run", "--name", name, "--workdir", str(work), "--", sys.executable, "job.py")
    d.wait_for(lambda s: (work / "started").exists(), what=f"{name} started")


# on the signal: what the fault note said at that moment (or "none"), then exit 75
READS_NOTE = (
    "import os, signal, sys, time\n"
    "def on_signal(*_):\n"
    "    try:\n"
    "        note = open(os.environ['GPUGUARD_FAULT_FILE']).read()\n"
    "    except OSError:\n"
    "        note = 'none'\n"
    "    open(f\"note-{os.environ['GPUGUARD_ATTEMPT']}\", 'w').write(note)\n"
    "    sys.exit(75)\n"
    "signal.signal(signal.SIGUSR1, on_signal)\n"
    "open('started', 'w').close()\n"
    "time.sleep(120)\n"
)


def fault_its_gpu(d: DaemonProc, name: str, xid: str = "79") -> str:
    """Fault the job's GPU with `xid`; wait for its restart; the GPU's UUID."""
    job = next(j for j in d.status()["jobs"] if j["name"] == name)
    index = next(g["index"] for g in d.status()["gpus"] if g["uuid"] in job["gpus"])
    d.ctl("inject", str(index), "xid", xid)
    d.wait_for(lambda s: any(j["name"] == name and j["attempt"] == 2 and j["state"] == "running" for j in s["jobs"]),
               timeout_s=20, what=f"{name} restarted")  # fmt: skip
    return str(job["gpus"][0])


def test_a_job_without_a_handler_gets_sigterm_at_once_and_an_event(tmp_path: Path) -> None:
    with running_daemon(tmp_path, gpus=2, extra_config=FAST, stop_jobs=["plain"]) as d:
        start(d, tmp_path, "plain", NO_HANDLER)
        fault_its_gpu(d, "plain")
        seen = d.events(job="plain")
        unsupported = [e for e in seen if e["kind"] == "checkpoint_unsupported"]
        assert len(unsupported) == 1 and "SIGUSR1" in unsupported[0]["message"]
        stopped = next(e for e in seen if e["kind"] == "job_stopping_done")
        assert "after SIGTERM" in stopped["message"] and "exit -10" not in stopped["message"]


def test_a_job_with_a_handler_still_gets_the_checkpoint_signal(tmp_path: Path) -> None:
    with running_daemon(tmp_path, gpus=2, extra_config=FAST, stop_jobs=["polite"]) as d:
        start(d, tmp_path, "polite", HANDLER)
        fault_its_gpu(d, "polite")
        seen = d.events(job="polite")
        assert not [e for e in seen if e["kind"] == "checkpoint_unsupported"]
        stopped = next(e for e in seen if e["kind"] == "job_stopping_done")
        assert "exit 75, after the checkpoint signal" in stopped["message"]


def test_exit_75_nobody_asked_for_backs_off_and_counts_toward_max_restarts(tmp_path: Path) -> None:
    """`sh -c 'exit 75'` restarted about once a second forever; now it gives up after --max-restarts."""
    with running_daemon(tmp_path, gpus=1, extra_config=FAST + "backoff_initial_s = 0.1\nbackoff_max_s = 0.4\n") as d:
        d.ctl("run", "--name", "asker", "--max-restarts", "3", "--workdir", str(tmp_path), "--", "sh", "-c", "exit 75")
        d.wait_for(lambda s: s["jobs"][0]["state"] == "failed", timeout_s=20, what="the job to give up")
        job = d.status()["jobs"][0]
        assert job["attempt"] == 4 and job["restarts"] == 3
        assert "exit 75 unasked" in job["reason"] and "max_restarts 3" in job["reason"]
        assert d.kinds(job="asker").count("job_restart_requested") == 3


@pytest.mark.parametrize(("xid", "lost"), [("79", True), ("48", False)])
def test_the_fault_note_says_why_before_the_signal_and_is_gone_after_the_stop(tmp_path: Path, xid: str, lost: bool) -> None:
    """Xid 79 (fallen off the bus) is a GPU that runs nothing any more: the trainer must not wait
    to answer; after Xid 48 it still can. The next attempt finds no note of this one's."""
    with running_daemon(tmp_path, gpus=2, extra_config=FAST, stop_jobs=["noted"]) as d:
        start(d, tmp_path, "noted", READS_NOTE)
        uuid = fault_its_gpu(d, "noted", xid)
        note = json.loads((tmp_path / "noted" / "note-1").read_text())
        assert note["attempt"] == 1 and note["gpu"] == uuid and note["gpu_lost"] is lost
        asked = next(e for e in d.events(job="noted") if e["kind"] == "checkpoint_requested")
        assert note["reason"] and note["reason"] in asked["message"]
        assert not (d.state_dir / "jobs" / "noted" / "fault").exists()


def test_a_note_that_cannot_be_written_costs_only_the_hint(tmp_path: Path) -> None:
    """Whatever stops the note (here a directory in its place; a full disk alike), the checkpoint
    signal still goes out and the job is moved as before."""
    with running_daemon(tmp_path, gpus=2, extra_config=FAST, stop_jobs=["unnoted"]) as d:
        start(d, tmp_path, "unnoted", READS_NOTE)
        (d.state_dir / "jobs" / "unnoted" / "fault").mkdir()
        fault_its_gpu(d, "unnoted")
        assert (tmp_path / "unnoted" / "note-1").read_text() == "none"
        stopped = next(e for e in d.events(job="unnoted") if e["kind"] == "job_stopping_done")
        assert "exit 75, after the checkpoint signal" in stopped["message"]
