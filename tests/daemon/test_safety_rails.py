"""The safety rails of a real `gpuguardd --simulate 2`, each reached through
gpuguardctl: the daily reset cap, failed probation, a reset refused while a
process holds the GPU or while a reset of it runs, a job that cannot start,
an unreadable job record at start-up, and processes that survive SIGKILL."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from harness import BIN, DaemonProc, gone, wait_until
from gpuguard.store import EventStore

pytestmark = pytest.mark.e2e

FAST_STOP = "[jobs]\ncheckpoint_grace_s = 0.5\nstop_timeout_s = 0.5\n"
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]  # catches no checkpoint signal: SIGTERM ends it


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[DaemonProc]:
    """A daemon the test configures and starts itself; its jobs are stopped at the end."""
    d = DaemonProc(tmp_path)
    yield d
    if d.proc is not None and d.proc.poll() is None:
        for job in d.status()["jobs"]:
            d.ctl("stop", job["name"], check=False)
        wait_until(lambda: all(j["pid"] is None for j in d.status()["jobs"]), 15, "every job stopped")
        d.stop()


def one_gpu_job(d: DaemonProc, extra_config: str) -> str:
    """Start the daemon with GPU 1 excluded and a job on GPU 0; returns GPU 0's uuid."""
    d.config.write_text(d.config.read_text() + FAST_STOP + extra_config)
    d.start()
    d.ctl("exclude", "1", "--reason", "kept out by the test")
    gpu0 = d.gpu(0)["uuid"]
    d.ctl("run", "--name", "j", "--workdir", str(d.tmp), "--", *SLEEPER)
    d.wait_for(lambda s: s["jobs"][0]["state"] == "running" and s["jobs"][0]["gpus"] == [gpu0], what="j running on GPU 0")
    return gpu0


# --- resets after a fault: the daily cap, probation ------------------------------


def test_the_daily_cap_refuses_a_second_reset_and_the_gpu_stays_excluded(proc: DaemonProc) -> None:
    d = proc
    gpu0 = one_gpu_job(d, "[reset]\nmax_per_gpu_per_day = 1\nprobation_s = 0.5\n")

    d.ctl("inject", "0", "xid", "95")  # reset class: excluded, reset once the job is off it, probation
    wait_until(lambda: d.events("gpu_included"), 15, "GPU 0 back after its reset and probation")
    d.wait_for(lambda s: s["jobs"][0]["state"] == "running" and s["jobs"][0]["attempt"] == 2, timeout_s=15, what="j back on GPU 0")
    first = d.events("gpu_reset")
    assert [(e["gpu"], e["ok"], e.get("skipped")) for e in first] == [(gpu0, True, None)]
    assert d.job("j")["gpus"] == [gpu0]

    d.ctl("inject", "0", "xid", "95")  # the same GPU, the same day: one reset was the cap
    refused = wait_until(lambda: [e for e in d.events("gpu_reset") if e.get("skipped")], 15, "the refused reset")
    assert len(refused) == 1
    assert (refused[0]["gpu"], refused[0]["ok"], refused[0]["severity"]) == (gpu0, False, "error")
    assert "1 reset(s) in the last 24 h" in refused[0]["message"] and "stays excluded" in refused[0]["message"]

    d.polls_after(time.time())  # probation_s and more: nothing brings it back
    gpu = d.gpu(0)
    assert gpu["state"] == "excluded" and gpu["health"] == "faulted"
    assert [e["ok"] for e in d.events("gpu_reset")] == [True, False]
    assert len(d.events("gpu_included")) == 1
    # a second fault move soon after the first backs off first (a job that does not stay up),
    # then finds no healthy GPU
    d.wait_for(lambda s: s["jobs"][0]["state"] == "waiting", timeout_s=15, what="j waiting for a GPU")


def test_a_fault_during_probation_keeps_the_gpu_excluded(proc: DaemonProc) -> None:
    d = proc
    gpu0 = one_gpu_job(d, "[reset]\nprobation_s = 60\n")

    d.ctl("inject", "0", "xid", "95")
    wait_until(lambda: d.events("gpu_reset"), 15, "the reset after the job left GPU 0")
    d.wait_for(lambda s: s["gpus"][0]["health"] == "healthy", what="GPU 0 healthy after its reset")
    assert d.gpu(0)["state"] == "excluded"  # on probation

    d.ctl("inject", "0", "thermal", "99")  # past temperature_faulted_c during probation
    failed = wait_until(lambda: d.events("gpu_probation_failed"), 10, "probation failed")
    assert len(failed) == 1 and failed[0]["gpu"] == gpu0 and "stays excluded" in failed[0]["message"]

    d.ctl("inject", "0", "clear")  # healthy again; probation is over for good
    d.wait_for(lambda s: s["gpus"][0]["health"] == "healthy", what="GPU 0 healthy again")
    d.polls_after(time.time())
    assert d.gpu(0)["state"] == "excluded"
    assert d.events("gpu_included") == [] and len(d.events("gpu_probation_failed")) == 1
    assert d.job("j")["state"] == "waiting"


# --- operator resets -----------------------------------------------------------


def test_a_reset_is_refused_while_a_process_holds_the_gpu(proc: DaemonProc) -> None:
    d = proc
    d.start()
    me = os.getpid()
    d.ctl("inject", "0", "attach", str(me))
    d.wait_for(lambda s: me in {p["pid"] for p in s["gpus"][0]["processes"]}, what="this test's process on GPU 0")
    refused = d.ctl("reset", "0", check=False)
    assert refused.returncode == 1, refused
    pids = re.search(r"processes still hold the GPU \(pids ([\d, ]+)\)", refused.stderr)
    assert pids is not None, refused.stderr
    assert me in {int(p) for p in pids.group(1).split(", ")}
    assert d.events("gpu_reset") == []  # nothing was tried

    d.ctl("inject", "0", "detach", str(me))
    d.wait_for(lambda s: s["gpus"][0]["processes"] == [], what="GPU 0 free")
    done = d.ctl("reset", "0", check=False)
    assert done.returncode == 0, done.stderr
    assert [e["ok"] for e in d.events("gpu_reset")] == [True]


def test_a_second_reset_of_a_gpu_is_refused_while_the_first_runs(proc: DaemonProc) -> None:
    d = proc
    d.config.write_text(d.config.read_text() + '[reset]\ncommand = ["sleep", "3"]\n')
    d.start()
    first = subprocess.Popen(
        [str(BIN / "gpuguardctl"), "--socket", str(d.socket), "reset", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )  # fmt: skip
    try:
        d.wait_for(lambda s: s["gpus"][0]["state"] == "resetting", what="GPU 0 resetting")
        second = d.ctl("reset", "0", check=False)
        assert second.returncode == 1 and "a reset of this GPU is already in progress" in second.stderr, second
        assert d.gpu(0)["state"] == "resetting"  # the first one is not disturbed
        out, err = first.communicate(timeout=20)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err
    d.wait_for(lambda s: s["gpus"][0]["state"] == "healthy", what="GPU 0 healthy after the reset")
    resets = d.events("gpu_reset")
    assert [e["ok"] for e in resets] == [True] and resets[0]["argv"] == ["sleep", "3"]


# --- jobs ------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["/nonexistent/bin/train", "gpuguard-no-such-trainer"])
def test_a_job_that_cannot_start_fails_with_the_reason(proc: DaemonProc, command: str) -> None:
    d = proc
    d.start()
    d.ctl("run", "--name", "nope", "--workdir", str(d.tmp), "--", command, "--epochs", "3", check=False)
    d.wait_for(lambda s: s["jobs"] and s["jobs"][0]["state"] == "failed", what="the job failed")
    job = d.find_job("nope")
    assert job is not None and job["pid"] is None and job["gpus"] == []
    assert job["reason"].startswith("cannot start: ") and command in job["reason"], job["reason"]
    failed = d.events("job_failed", job="nope")
    assert len(failed) == 1 and "nope failed to start" in failed[0]["message"] and command in failed[0]["message"]
    assert d.events("job_started", job="nope") == []
    assert all(g["jobs"] == [] for g in d.status()["gpus"])
    # the daemon goes on: the next job starts
    d.ctl("run", "--name", "fine", "--workdir", str(d.tmp), "--", sys.executable, "-c", "pass")
    d.wait_for(lambda s: job_view_of(s, "fine")["state"] == "succeeded", timeout_s=15, what="the next job succeeded")


def job_view_of(status: dict[str, Any], name: str) -> dict[str, Any]:
    return next((j for j in status["jobs"] if j["name"] == name), {"state": None})


def _put_record(d: DaemonProc, name: str, record: dict[str, Any]) -> None:
    """Write a job record into both copies the daemon reads: the DB row and the records file."""
    d.state_dir.mkdir(parents=True, mode=0o711)
    store = EventStore(d.state_dir / "gpuguard.db", records=d.state_dir / "records")
    try:
        store.put_job(name, record)
    finally:
        store.close()
    assert json.loads((d.state_dir / "records" / "jobs" / f"{name}.json").read_text())["record"] == record


@pytest.mark.parametrize(
    "record",
    [
        pytest.param({"version": 2, "state": "running", "spec": {"name": "broken"}, "attempt": {}}, id="spec-without-command"),
        pytest.param({"state": "running", "name": "broken", "pid": 4242}, id="version-1-without-command"),
        pytest.param({"version": 2, "state": "running", "spec": "not an object", "attempt": {}}, id="spec-not-an-object"),
    ],
)
def test_an_unreadable_job_record_is_logged_and_the_daemon_runs_on(proc: DaemonProc, record: dict[str, Any]) -> None:
    d = proc
    _put_record(d, "broken", record)
    d.start()
    log = d.log.read_text()
    assert "job_record_unreadable" in log, log[-3000:]
    assert d.status()["jobs"] == []
    # it runs on, and the name is free for a new job that replaces the record
    d.ctl("run", "--name", "broken", "--workdir", str(d.tmp), "--", sys.executable, "-c", "pass")
    d.wait_for(lambda s: job_view_of(s, "broken")["state"] == "succeeded", timeout_s=15, what="the new job succeeded")


FREEZER = Path("/sys/fs/cgroup/freezer")


def _freezer_available() -> bool:
    return os.geteuid() == 0 and (FREEZER / "cgroup.procs").exists() and os.access(FREEZER, os.W_OK)


@pytest.mark.skipif(not _freezer_available(), reason="needs root and a cgroup v1 freezer hierarchy")
@pytest.mark.root
def test_a_process_that_survives_sigkill_is_reported(proc: DaemonProc) -> None:
    """A task frozen by the cgroup v1 freezer sleeps uninterruptibly: SIGKILL stays
    pending until it is thawed, as with a process stuck in the driver."""
    d = proc
    d.config.write_text(d.config.read_text() + FAST_STOP)
    d.start()
    d.ctl("run", "--name", "stuck", "--workdir", str(d.tmp), "--", *SLEEPER)
    d.wait_for(lambda s: job_view_of(s, "stuck")["state"] == "running", what="stuck running")
    wrapper = d.job("stuck")["pid"]
    trainer = wait_until(lambda: psutil.Process(wrapper).children(), 5, "the job under its wrapper")[0]
    cgroup = FREEZER / f"gpuguard-test-{os.getpid()}-{trainer.pid}"
    cgroup.mkdir()
    try:
        (cgroup / "cgroup.procs").write_text(str(trainer.pid))
        (cgroup / "freezer.state").write_text("FROZEN")
        wait_until(lambda: (cgroup / "freezer.state").read_text().strip() == "FROZEN", 5, "the job frozen")
        d.ctl("stop", "stuck")
        incomplete = wait_until(lambda: d.events("job_stop_incomplete", job="stuck"), 20, "job_stop_incomplete")
        assert len(incomplete) == 1 and incomplete[0]["severity"] == "error"
        assert f"processes survived SIGKILL: {trainer.pid}" in incomplete[0]["message"]
        assert not gone(trainer.pid)
        d.wait_for(lambda s: job_view_of(s, "stuck")["state"] == "stopped", what="stuck stopped")
        assert d.proc is not None and d.proc.poll() is None
    finally:
        (cgroup / "freezer.state").write_text("THAWED")
        try:
            wait_until(lambda: gone(trainer.pid), 10, "the thawed job's end (its SIGKILL was pending)")
            wait_until(lambda: not (cgroup / "cgroup.procs").read_text().strip(), 5, "the freezer cgroup empty")
        finally:
            with contextlib.suppress(OSError):
                cgroup.rmdir()
