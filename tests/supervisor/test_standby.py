"""The warm standby (issue #16) on fakes of the supervisor's ports: real short jobs
(jobs/standby_job.py), no daemon. Also the trainer's client (gpuguard.job) and the
hand-over file's safety, in process."""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest

from gpuguard import contract
from gpuguard import job as client
from gpuguard.events import EventKind
from gpuguard.supervisor.job import Job
from gpuguard.supervisor.process import JobProcess
from gpuguard.supervisor.files import remove
from gpuguard.supervisor.standby import write_handover
from gpuguard.supervisor.states import JobState
from gpuguard.supervisor.supervisor import Supervisor

from .fakes import FAST, GPU0, GPU1, Node, faulted, gone, wait_for

pytestmark = pytest.mark.e2e

JOB = Path(__file__).parent / "jobs" / "standby_job.py"
QUICK = replace(FAST, standby_delay_s=0.0)  # a standby as soon as the attempt shows progress


@pytest.fixture
def node(tmp_path: Path, watched: Callable[[Node], Node]) -> Node:
    return watched(Node(tmp_path, settings=QUICK))


def submit(node: Node, sup: Supervisor, name: str = "j", *, standby: bool = True) -> Job:
    workdir = node.root / "work"
    workdir.mkdir(exist_ok=True)
    request = {"name": name, "command": [sys.executable, str(JOB)], "workdir": str(workdir), "standby": standby}
    return sup.submit(request, os.getuid(), os.getgid(), tuple(os.getgroups()))


def lines(node: Node) -> list[dict[str, Any]]:
    path = node.root / "work" / "standby.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def phase(node: Node, name: str, pid: int | None = None) -> dict[str, Any] | None:
    """The job's line of that phase (of the process whose wrapper is pid, when given)."""
    kids = {c.pid for c in psutil.Process(pid).children()} if pid is not None and not gone_pid(pid) else None
    for line in lines(node):
        if line["phase"] == name and (kids is None or line["pid"] in kids):
            return line
    return None


def gone_pid(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def standby_of(node: Node, sup: Supervisor, job: Job) -> JobProcess:
    """Tick until the job has a standby that has started (its "imported" line is written)."""
    node.tick_until(sup, lambda: job.rt.standby is not None and phase(node, "imported", job.rt.standby.pid), "a waiting standby")
    assert job.rt.standby is not None
    return job.rt.standby


def tree(proc: JobProcess) -> dict[int, float]:
    return {p.pid: p.create_time() for p in proc.tree()}


def test_the_standby_waits_without_gpus_and_is_promoted_on_a_fault(node: Node) -> None:
    """Started once the attempt shows progress, with no GPU; on a fault it is handed GPU 1
    and becomes attempt 2 (same process); a new standby follows."""
    sup = node.supervisor()
    job = submit(node, sup)
    first = job.attempt.pid
    standby = standby_of(node, sup, job)
    waiting = phase(node, "imported", standby.pid)
    assert waiting is not None and waiting["cvd"] == "" and waiting["attempt"] is None and waiting["standby"] == "1"
    assert standby.pid not in {pid for _, pid in node.pool.called("occupied")}, "a standby is never on a GPU"
    assert sup.view()[0]["standby"]["pid"] == standby.pid and sup.view()[0]["standby"]["state"] == "waiting"
    assert EventKind.STANDBY_STARTED in node.log.kinds("j")

    node.facts = faulted(node.facts, GPU0)
    node.tick_until(sup, lambda: job.state == JobState.RUNNING and job.attempt.number == 2, "attempt 2 running")
    assert job.attempt.pid == standby.pid and job.attempt.pid != first
    assert job.attempt.gpus == [GPU1] and job.attempt.slot == 1
    assert node.records.saved["j"]["attempt"]["pid"] == standby.pid
    assert (GPU1, standby.pid) in node.pool.called("occupied")
    kinds = node.log.kinds("j")
    assert kinds.index(EventKind.STANDBY_PROMOTED) < kinds.index(EventKind.JOB_RESTARTED)
    wait_for(lambda: phase(node, "told", standby.pid), "the standby to be told")
    told = phase(node, "told", standby.pid)
    assert told is not None and told["cvd"] == GPU1 and told["attempt"] == "2" and told["standby"] is None
    # the next standby, in the other slot, for attempt 3
    node.tick_until(sup, lambda: job.rt.standby is not None, "a new standby")
    assert job.rt.standby is not None and job.rt.standby.pid != standby.pid


def test_a_standby_that_dies_is_replaced(node: Node) -> None:
    sup = node.supervisor()
    job = submit(node, sup)
    standby = standby_of(node, sup, job)
    os.kill(standby.pid, signal.SIGKILL)
    node.tick_until(sup, lambda: job.rt.standby is not None and job.rt.standby.pid != standby.pid, "a replacement")
    died = node.log.of(EventKind.STANDBY_DIED)
    assert len(died) == 1 and died[0].data["backoff_s"] > 0
    assert job.state == JobState.RUNNING and job.attempt.pid not in (None, standby.pid)


def test_stopping_the_job_ends_its_standby(node: Node) -> None:
    sup = node.supervisor()
    job = submit(node, sup)
    before = tree(standby_of(node, sup, job))
    sup.stop("j", "test")
    node.tick_until(sup, lambda: job.state == JobState.STOPPED, "stopped")
    wait_for(lambda: gone(before), "the standby's processes to end")
    assert job.rt.standby is None and sup.view()[0]["standby"] is None


def test_no_standby_while_memory_is_short(node: Node) -> None:
    """Skipped with one event, looked at again each tick; a standby starts once memory is there."""
    node.settings = replace(QUICK, standby_min_free_mb=10**9)
    sup = node.supervisor()
    job = submit(node, sup)
    node.tick_until(sup, lambda: node.log.of(EventKind.STANDBY_SKIPPED), "standby_skipped")
    node.tick_until(sup, lambda: job.rt.clock is not None and job.rt.clock.started_up, "a heartbeat")
    assert len(node.log.of(EventKind.STANDBY_SKIPPED)) == 1 and job.rt.standby is None
    node.settings = QUICK
    standby_of(node, sup, job)


def test_a_waiting_standby_is_ended_when_the_node_runs_short_of_memory(node: Node) -> None:
    """Under half of standby_min_free_mb available: the training's memory comes first. One event;
    no new standby while short; one again once the memory is back."""
    sup = node.supervisor()
    job = submit(node, sup)
    standby = standby_of(node, sup, job)
    before = tree(standby)
    node.settings = replace(QUICK, standby_min_free_mb=10**9)
    node.tick_until(sup, lambda: job.rt.standby is None, "the standby ended")
    wait_for(lambda: gone(before), "the standby's processes to end")
    skipped = node.log.of(EventKind.STANDBY_SKIPPED)
    assert len(skipped) == 1 and skipped[0].data["ended_pid"] == standby.pid
    for _ in range(3):
        sup.tick(time.time(), node.facts)
    assert job.rt.standby is None and len(node.log.of(EventKind.STANDBY_SKIPPED)) == 1
    assert job.state == JobState.RUNNING and job.attempt.pid is not None and not gone_pid(job.attempt.pid)
    node.settings = QUICK
    assert standby_of(node, sup, job).pid != standby.pid


def test_a_job_without_standby_gets_none(node: Node) -> None:
    sup = node.supervisor()
    job = submit(node, sup, standby=False)
    node.tick_until(sup, lambda: job.rt.clock is not None and job.rt.clock.started_up, "a heartbeat")
    for _ in range(3):  # ticks in which a standby job would start its standby (standby_delay_s 0)
        sup.tick(time.time(), node.facts)
    assert job.rt.standby is None and sup.view()[0]["standby"] is None
    line = phase(node, "told")
    assert line is not None and line["cvd"] == GPU0 and line["attempt"] == "1", "wait_until_started returns at once"


def test_a_new_daemon_ends_the_standby_of_the_old_one(node: Node) -> None:
    """Never adopted: the attempt is, the standby is stopped and a new one follows."""
    sup = node.supervisor()
    job = submit(node, sup)
    old = tree(standby_of(node, sup, job))
    job.rt.standby = None  # the old daemon dies without ending it
    sup2 = node.supervisor()
    wait_for(lambda: gone(old), "the old standby to be ended")
    job2 = sup2.jobs["j"]
    assert job2.attempt.pid == job.attempt.pid and job2.rt.proc is not None
    assert EventKind.JOB_LEFTOVERS_STOPPED in node.log.kinds("j")
    node.tick_until(sup2, lambda: job2.rt.standby is not None, "a new standby")


# --- the client (gpuguard.job) and the hand-over file ----------------------------


def test_outside_a_standby_the_client_returns_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(contract.ENV_STANDBY, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a")
    monkeypatch.setenv(contract.ENV_ATTEMPT, "3")
    assert client.wait_until_started(timeout_s=0) == {"CUDA_VISIBLE_DEVICES": "GPU-a", "GPUGUARD_ATTEMPT": "3"}


def test_the_client_waits_for_the_handover_and_sets_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    handover = tmp_path / "handover.1"
    monkeypatch.setenv(contract.ENV_STANDBY, "1")
    monkeypatch.setenv(contract.ENV_STANDBY_FILE, str(handover))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv(contract.ENV_RESUME_FROM, "/stale")
    with pytest.raises(TimeoutError):
        client.wait_until_started(timeout_s=0.05)
    told = {"CUDA_VISIBLE_DEVICES": "GPU-b", "GPUGUARD_ATTEMPT": "2"}
    writer = threading.Thread(target=write_handover, args=(handover, told, None))
    writer.start()
    assert client.wait_until_started(timeout_s=10) == told
    writer.join()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "GPU-b" and os.environ[contract.ENV_ATTEMPT] == "2"
    assert contract.ENV_RESUME_FROM not in os.environ, "no resume path handed over: none is left set"
    assert contract.ENV_STANDBY not in os.environ and contract.ENV_STANDBY_FILE not in os.environ


def test_the_client_refuses_a_malformed_handover(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    handover = tmp_path / "handover.0"
    handover.write_text(json.dumps({"CUDA_VISIBLE_DEVICES": "x", "GPUGUARD_ATTEMPT": "1", "LD_PRELOAD": "/evil.so"}))
    monkeypatch.setenv(contract.ENV_STANDBY, "1")
    monkeypatch.setenv(contract.ENV_STANDBY_FILE, str(handover))
    with pytest.raises(client.HandOverError):
        client.wait_until_started(timeout_s=1)


def test_the_handover_never_follows_a_planted_link(tmp_path: Path) -> None:
    """Links at the temp name and at the final name are replaced, never written through;
    the file is the job's to read only; a symlinked directory is refused."""
    jobdir = tmp_path / "jobs" / "j"
    jobdir.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (jobdir / ".handover.1.tmp").symlink_to(victim)
    (jobdir / "handover.1").symlink_to(victim)
    write_handover(jobdir / "handover.1", {"CUDA_VISIBLE_DEVICES": "GPU-c", "GPUGUARD_ATTEMPT": "4"}, None)
    st = os.lstat(jobdir / "handover.1")
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o400 and victim.read_text() == "keep"
    assert json.loads((jobdir / "handover.1").read_text())["GPUGUARD_ATTEMPT"] == "4"
    assert sorted(p.name for p in jobdir.iterdir()) == ["handover.1"]
    remove(jobdir / "handover.1")
    assert not (jobdir / "handover.1").exists()
    (tmp_path / "jobs" / "k").symlink_to(jobdir)
    with pytest.raises(OSError):
        write_handover(tmp_path / "jobs" / "k" / "handover.0", {"CUDA_VISIBLE_DEVICES": "", "GPUGUARD_ATTEMPT": "1"}, None)
