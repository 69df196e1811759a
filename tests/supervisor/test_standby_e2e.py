"""The warm standby (issue #16) end to end: a real `gpuguardd --simulate 2`, the job
(jobs/standby_job.py) started with `gpuguardctl run --standby`, faults injected."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from gpuguard.config import JobsConfig
from harness import DaemonProc, gone, wait_until

pytestmark = pytest.mark.e2e

JOB = Path(__file__).parent / "jobs" / "standby_job.py"


def run(daemon: DaemonProc, workdir: Path, name: str, *flags: str) -> None:
    workdir.mkdir()
    daemon.ctl("run", "--name", name, "--workdir", str(workdir), *flags, "--", sys.executable, str(JOB))


def lines(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / "standby.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def line_of(workdir: Path, phase: str, pid: int) -> dict[str, Any] | None:
    """The job's line of that phase, written by the child of wrapper `pid`."""
    try:
        kids = {c.pid for c in psutil.Process(pid).children()}
    except psutil.NoSuchProcess:
        return None
    return next((line for line in lines(workdir) if line["phase"] == phase and line["pid"] in kids), None)


def waiting_standby(daemon: DaemonProc, name: str, workdir: Path, other_than: int | None = None) -> int:
    """The pid (its wrapper) of the job's standby once it has started and waits."""

    def found() -> int | None:
        sb = daemon.job(name)["standby"]
        if sb is None or sb["pid"] == other_than or line_of(workdir, "imported", sb["pid"]) is None:
            return None
        return int(sb["pid"])

    return wait_until(found, 20, f"a waiting standby of {name}", detail=lambda: str(daemon.job(name)))


def on_gpus(daemon: DaemonProc) -> set[int]:
    """Every pid the simulated GPUs list as a holder."""
    return {p["pid"] for g in daemon.status()["gpus"] for p in g.get("processes", [])}


def test_a_fault_promotes_the_standby_and_a_dead_one_is_replaced(daemon: DaemonProc, tmp_path: Path) -> None:
    work = tmp_path / "work"
    run(daemon, work, "sb", "--standby")
    try:
        standby = waiting_standby(daemon, "sb", work)
        job_pid = next(iter(psutil.Process(standby).children())).pid
        imported = line_of(work, "imported", standby)
        assert imported is not None and imported["cvd"] == "" and imported["attempt"] is None
        assert imported["nvml_check"] == "1"  # torch.cuda.is_available() must not start CUDA with no GPU
        assert not {standby, job_pid} & on_gpus(daemon), "a standby is never listed on a GPU"
        gpu1 = daemon.gpu(1)["uuid"]

        daemon.ctl("inject", "0", "xid", "79")
        daemon.wait_for(lambda s: (j := s["jobs"][0])["attempt"] == 2 and j["state"] == "running", 20, "attempt 2 running")
        assert daemon.job("sb")["pid"] == standby, "the standby's process is the new attempt"
        told = wait_until(lambda: line_of(work, "told", standby), 10, "the standby told")
        assert told["pid"] == job_pid and told["cvd"] == gpu1 and told["attempt"] == "2"
        assert [line["cvd"] for line in lines(work) if line["pid"] == job_pid] == ["", gpu1]
        wait_until(lambda: standby in on_gpus(daemon), 10, "the promoted attempt listed on GPU 1")
        assert "standby_promoted" in daemon.kinds("sb")

        replacement = waiting_standby(daemon, "sb", work, other_than=standby)
        assert replacement not in on_gpus(daemon)
        os.kill(next(iter(psutil.Process(replacement).children())).pid, signal.SIGKILL)
        third = waiting_standby(daemon, "sb", work, other_than=replacement)
        assert "standby_died" in daemon.kinds("sb") and daemon.job("sb")["pid"] == standby
    finally:
        daemon.ctl("stop", "sb", check=False)
    daemon.wait_for(lambda s: s["jobs"][0]["state"] == "stopped" and s["jobs"][0]["standby"] is None, 20, "stopped")
    wait_until(lambda: gone(third), 10, "the standby ended with its job")


def test_a_job_without_standby_behaves_as_before(daemon: DaemonProc, tmp_path: Path) -> None:
    work = tmp_path / "plain"
    run(daemon, work, "plain")
    try:
        first = wait_until(lambda: next((x for x in lines(work) if x["phase"] == "told"), None), 20, "the job running")
        assert first["attempt"] == "1" and first["cvd"] == daemon.gpu(0)["uuid"], "wait_until_started returned at once"
        # polls after the moment a standby job would have started its standby
        daemon.polls_after(first["t"] + JobsConfig().standby_delay_s + 0.5)
        assert daemon.job("plain")["standby"] is None and "standby_started" not in daemon.kinds("plain")
        daemon.ctl("inject", "0", "xid", "79")
        daemon.wait_for(lambda s: (j := s["jobs"][0])["attempt"] == 2 and j["state"] == "running", 20, "attempt 2 running")
        assert "standby_promoted" not in daemon.kinds("plain")
    finally:
        daemon.ctl("stop", "plain", check=False)
    daemon.wait_for(lambda s: s["jobs"][0]["state"] == "stopped", 20, "stopped")
