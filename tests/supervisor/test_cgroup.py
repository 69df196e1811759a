"""Jobs in their own cgroup v2: a process that left the job's session and parent chain still
dies with the job, also when the job was adopted after a daemon restart.

Real processes, the test's own. Skipped where no writable cgroup v2 is found.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from gpuguard.supervisor import cgroup
from gpuguard.supervisor.process import JobProcess, adopt, spawn

PY = sys.executable
SLEEP = shutil.which("sleep") or "/bin/sleep"

# The job: its child starts a new session and forks the escapee, then exits, so the escapee is
# reparented away (to init: pytest is no subreaper). The escapee ignores SIGTERM and execs with
# an empty environment: no GPUGUARD_WRAPPER_PID leads back to the job. The job's main process
# ignores SIGTERM too, so the stop reaches its kill phase.
ESCAPING_JOB = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
middle = os.fork()
if middle == 0:
    os.setsid()
    escapee = os.fork()
    if escapee == 0:
        os.execve({sleep!r}, ["sleep", "60"], {{}})
    with open({pidfile!r} + ".tmp", "w") as f:
        f.write(str(escapee))
    os.rename({pidfile!r} + ".tmp", {pidfile!r})
    os._exit(0)
os.waitpid(middle, 0)
print("ready", flush=True)
time.sleep(60)
"""


def _wait_for(check: Callable[[], object], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def escaping_job(tmp: Path) -> tuple[str, Path]:
    """The job's script and the file where it writes the escapee's pid."""
    pidfile = tmp / "escapee.pid"
    return textwrap.dedent(ESCAPING_JOB.format(sleep=SLEEP, pidfile=str(pidfile))), pidfile


def wait_escapee(pidfile: Path, log: Path, wrapper: int) -> int:
    """The escapee's pid, once the job says it is reparented away (out of the wrapper's session)."""
    _wait_for(lambda: log.exists() and "ready" in log.read_text())
    pid = int(pidfile.read_text())
    assert os.getsid(pid) != wrapper and psutil.Process(pid).ppid() != os.getpid()
    return pid


@pytest.fixture
def needs_cgroup(tmp_path: Path) -> None:
    """Skip unless this process can make a job cgroup (a writable cgroup v2 holds its own cgroup)."""
    probe = cgroup.create("probe", tmp_path / "probe-status")
    if probe is None:
        pytest.skip("no writable cgroup v2 hierarchy")
    probe.remove()


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
            if not _gone(pid):
                psutil.Process(pid).kill()
        for job in self.jobs:
            if job.cgroup is not None:
                _wait_for(job.cgroup.remove, 2)


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
    _wait_for(lambda: _gone(escapee))
    assert not job.cgroup.path.exists()


def test_without_cgroup_kill_every_member_is_killed_one_by_one(
    tmp_path: Path, needs_cgroup: None, left: Leftovers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kernels before 5.14 have no cgroup.kill: each member is SIGKILLed by pidfd."""
    monkeypatch.setattr(cgroup.JobCgroup, "kill", cgroup.JobCgroup._kill_each)
    job, escapee = start(tmp_path, "escape", left)
    result = job.stop(None, grace_s=0, term_timeout_s=0.3)
    assert (result.phase, result.survivors) == ("kill", ())
    _wait_for(lambda: _gone(escapee))


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
    _wait_for(lambda: _gone(escapee))
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
    assert not _gone(escapee)  # what process-tree tracking cannot catch: it left the tree unseen
