"""Jobs in their own cgroup v2: a process that left the job's session and parent chain still
dies with the job, also when the job was adopted after a daemon restart.

Real processes, the test's own. Skipped where no writable cgroup v2 is found.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from harness import gone, wait_until
from gpuguard.supervisor import cgroup
from gpuguard.supervisor.process import JobProcess, adopt, spawn

from .escaping_job import escaping_job

pytestmark = pytest.mark.e2e

PY = sys.executable


def wait_escapee(pidfile: Path, log: Path, wrapper: int) -> int:
    """The escapee's pid, once the job says it is reparented away (out of the wrapper's session)."""
    wait_until(lambda: log.exists() and "ready" in log.read_text(), 10, "the job's escapee reparented away", interval=0.01)
    pid = int(pidfile.read_text())
    assert os.getsid(pid) != wrapper and psutil.Process(pid).ppid() != os.getpid()
    return pid


class Leftovers:
    """What a test started: whatever of it still runs at the test's end is killed."""

    def __init__(self) -> None:
        self.jobs: list[JobProcess] = []
        self.pids: list[int] = []

    def end(self) -> None:
        for job in self.jobs:
            job.signal_tree(signal.SIGKILL)
            if job.cgroup is not None:
                job.cgroup.kill()
            job.wait(2)
        for pid in self.pids:
            if not gone(pid):
                psutil.Process(pid).kill()
        for job in self.jobs:
            if job.cgroup is not None:
                wait_until(job.cgroup.remove, 2, "the job's cgroup removed", interval=0.01)


@pytest.fixture
def left() -> Iterator[Leftovers]:
    leftovers = Leftovers()
    yield leftovers
    leftovers.end()


def start(tmp: Path, name: str, left: Leftovers) -> tuple[JobProcess, int]:
    """Spawn the escaping job; returns it and its escapee's pid."""
    script, pidfile = escaping_job(tmp)
    log = tmp / "job.log"
    job = spawn([PY, "-c", script], env=dict(os.environ), cwd=tmp, user=None, log_path=log, job_name=name)
    left.jobs.append(job)
    escapee = wait_escapee(pidfile, log, job.pid)
    left.pids.append(escapee)
    return job, escapee


@pytest.mark.root
def test_an_escapee_is_in_the_tree_and_dies_with_the_job(
    tmp_path: Path, needs_cgroup: None, left: Leftovers
) -> None:
    job, escapee = start(tmp_path, "escape", left)
    assert job.cgroup is not None and escapee in job.cgroup.pids()
    assert job.pid not in job.cgroup.pids()  # the wrapper stays out: a cgroup kill cannot end it unrecorded
    assert escapee in {p.pid for p in job.tree()}
    result = job.stop(None, grace_s=0, term_timeout_s=0.3)
    assert (result.phase, result.returncode, result.survivors) == ("kill", -signal.SIGKILL, ())
    assert escapee in result.killed
    wait_until(lambda: gone(escapee), 10, "the escapee's end", interval=0.01)
    assert not job.cgroup.path.exists()


@pytest.mark.root
def test_without_cgroup_kill_every_member_is_killed_one_by_one(
    tmp_path: Path, needs_cgroup: None, left: Leftovers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kernels before 5.14 have no cgroup.kill: each member is SIGKILLed by pidfd."""
    monkeypatch.setattr(cgroup.JobCgroup, "kill", cgroup.JobCgroup._kill_each)
    job, escapee = start(tmp_path, "escape", left)
    result = job.stop(None, grace_s=0, term_timeout_s=0.3)
    assert (result.phase, result.survivors) == ("kill", ())
    wait_until(lambda: gone(escapee), 10, "the escapee's end", interval=0.01)


OLD_DAEMON = """
import json, os, sys, time
from pathlib import Path
from gpuguard.supervisor.process import spawn
tmp, script = Path(sys.argv[1]), sys.argv[2]
job = spawn([sys.executable, "-c", script], env=dict(os.environ), cwd=tmp, user=None,
            log_path=tmp / "job.log", job_name="escape")
print(json.dumps({"pid": job.pid, "start_time": job.start_time, "status": str(job.status_path)}), flush=True)
time.sleep(30)
"""


@pytest.mark.root
def test_an_adopted_job_still_finds_and_kills_its_escapee(
    tmp_path: Path, needs_cgroup: None, left: Leftovers
) -> None:
    """A daemon restart: the spawning process is SIGKILLed, a fresh JobProcess comes from adopt()."""
    script, pidfile = escaping_job(tmp_path)
    daemon = subprocess.Popen([PY, "-c", OLD_DAEMON, str(tmp_path), script], stdout=subprocess.PIPE, text=True)
    assert daemon.stdout is not None
    with daemon.stdout:
        record = json.loads(daemon.stdout.readline())
    try:
        escapee = wait_escapee(pidfile, tmp_path / "job.log", record["pid"])
        left.pids.append(escapee)
    finally:
        daemon.kill()
        daemon.wait()

    job = adopt(record["pid"], record["start_time"], status_path=Path(record["status"]), job_name="escape")
    assert job is not None
    left.jobs.append(job)
    assert job.cgroup is not None
    assert escapee in {p.pid for p in job.tree()}
    result = job.stop(None, grace_s=0, term_timeout_s=0.3)
    assert escapee in result.killed and result.survivors == ()
    # the wrapper, outside the cgroup, recorded how the job's main process died
    assert (result.phase, result.returncode) == ("kill", -signal.SIGKILL)
    wait_until(lambda: gone(escapee), 10, "the escapee's end", interval=0.01)
    assert not job.cgroup.path.exists()


def test_without_a_cgroup_the_job_runs_as_before(
    tmp_path: Path, left: Leftovers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No writable cgroup v2 (or mkdir refused): process-tree tracking, the job unaffected."""
    monkeypatch.setitem(cgroup._hierarchy, "own", None)
    job, escapee = start(tmp_path, "escape", left)
    assert job.cgroup is None
    result = job.stop(None, grace_s=0, term_timeout_s=0.3)
    assert (result.phase, result.returncode, result.survivors) == ("kill", -signal.SIGKILL, ())
    assert not gone(escapee)  # what process-tree tracking cannot catch: it left the tree unseen
