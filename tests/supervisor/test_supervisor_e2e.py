"""The supervisor end to end: a real gpuguardd --simulate 2 driving the scripted
trainer (jobs/trainer.py) through gpuguardctl, as CONTRACT.md's "What a
managed job gets" promises."""

from __future__ import annotations

import grp
import json
import os
import signal
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import psutil
import pytest

from harness import NOBODY, DaemonProc, as_nobody, gone, running_daemon, wait_until

from .jobs.trainer import read_step
from .trainer_runs import FAST, GRACE_S, attempts, kill_leftovers, run_trainer, running_attempt

pytestmark = pytest.mark.e2e


class Setup:
    """One daemon per test, plus the job workdirs to clean up after it."""

    def __init__(self, tmp: Path, daemons: ExitStack) -> None:
        self.tmp = tmp
        self.daemons = daemons
        self.workdirs: list[Path] = []

    def daemon(self, extra_config: str = FAST, daemon_keys: str = "") -> DaemonProc:
        return self.daemons.enter_context(running_daemon(self.tmp, 2, extra_config, daemon_keys=daemon_keys))

    def workdir(self, name: str = "work", base: Path | None = None) -> Path:
        path = (base or self.tmp) / name
        path.mkdir()
        self.workdirs.append(path)
        return path


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    with ExitStack() as daemons:
        s = Setup(tmp_path, daemons)
        try:
            yield s
        finally:
            kill_leftovers(s.workdirs)  # before the daemons stop


# ---------------------------------------------------------------- the contract


def test_xid_79_moves_the_job_to_the_other_gpu(setup: Setup) -> None:
    d = setup.daemon()
    work = setup.workdir()
    run_trainer(d, "j79", work)
    first = running_attempt(d, "j79", work)
    gpu0, gpu1 = d.gpu(0)["uuid"], d.gpu(1)["uuid"]
    assert first["env"]["CUDA_VISIBLE_DEVICES"] == gpu0
    assert first["env"]["GPUGUARD_ATTEMPT"] == "1" and "GPUGUARD_RESUME_FROM" not in first["env"]
    assert first["env"]["GPUGUARD_JOB"] == "j79" and first["env"]["GPUGUARD_CHECKPOINT_SIGNAL"] == "SIGUSR1"
    wait_until((work / "ck.pt").exists, 10, "the trainer's first periodic checkpoint (a few steps in)")

    d.ctl("inject", "0", "xid", "79")
    second = wait_until(lambda: attempts(work)[1:], GRACE_S + 15, "the second attempt")[0]
    # it saved and exited inside the grace (no SIGTERM came), and the restart followed at once (no back-off)
    stopped = d.events("job_stopping_done", job="j79")
    assert [e["message"] for e in stopped] == ["job j79 stopped for a restart (exit 75, after the checkpoint signal)"]

    env = second["env"]
    assert env["GPUGUARD_ATTEMPT"] == "2"
    assert env["CUDA_VISIBLE_DEVICES"] == gpu1
    resume = Path(env["GPUGUARD_RESUME_FROM"])
    assert resume.is_absolute() and resume.is_relative_to(d.state_dir / "snapshots")
    assert read_step(resume) == second["start_step"] > 0
    job = d.job("j79")
    assert job["exit_code"] == 75 and job["gpus"] == [gpu1] and job["restarts"] == 1
    assert d.gpu(0)["state"] == "excluded"
    seen = d.kinds()
    for kind in ("checkpoint_requested", "gpu_excluded", "job_restarted"):
        assert kind in seen


def test_xid_13_restarts_once_on_the_same_gpu(setup: Setup) -> None:
    d = setup.daemon()
    work = setup.workdir()
    run_trainer(d, "j13", work)
    first = running_attempt(d, "j13", work)
    d.ctl("inject", "0", "xid", "13")
    second = running_attempt(d, "j13", work, attempt=2)
    assert second["env"]["GPUGUARD_ATTEMPT"] == "2"
    assert second["env"]["CUDA_VISIBLE_DEVICES"] == first["env"]["CUDA_VISIBLE_DEVICES"] == d.gpu(0)["uuid"]
    d.polls_after(time.time(), polls=5)  # several ticks with the Xid still inside its window
    assert len(attempts(work)) == 2
    assert d.kinds(job="j13").count("job_restarted") == 1
    assert d.job("j13")["state"] == "running"
    assert d.gpu(0)["state"] == "healthy"


def test_an_xid_13_from_before_the_job_does_not_restart_it(setup: Setup) -> None:
    d = setup.daemon()
    work = setup.workdir()
    d.ctl("inject", "0", "xid", "13")
    d.wait_for(lambda s: s["gpus"][0]["findings"], timeout_s=3, what="the Xid 13 seen")
    run_trainer(d, "late", work)
    running_attempt(d, "late", work)
    d.polls_after(time.time(), polls=5)  # several ticks with the old Xid still inside its window
    assert len(attempts(work)) == 1 and "checkpoint_requested" not in d.kinds(job="late")
    assert d.job("late")["state"] == "running" and d.job("late")["attempt"] == 1


def test_xid_95_resets_the_gpu_and_returns_it_after_probation(setup: Setup) -> None:
    script = setup.tmp / "reset.py"
    calls = setup.tmp / "reset-calls.txt"
    script.write_text(f"import sys\nwith open({str(calls)!r}, 'a') as f:\n    f.write(' '.join(sys.argv[1:]) + '\\n')\n")
    command = json.dumps([sys.executable, str(script), "{uuid}"])  # a JSON list of strings is a TOML array
    d = setup.daemon(FAST + f"[reset]\ncommand = {command}\nprobation_s = 1\n")
    work = setup.workdir()
    run_trainer(d, "j95", work)
    running_attempt(d, "j95", work)
    gpu0, gpu1 = d.gpu(0)["uuid"], d.gpu(1)["uuid"]
    d.ctl("inject", "0", "xid", "95")
    second = running_attempt(d, "j95", work, attempt=2)
    assert second["env"]["CUDA_VISIBLE_DEVICES"] == gpu1
    assert "gpu_excluded" in d.kinds()
    wait_until(lambda: calls.exists() and calls.read_text(), 5, "the reset command")
    assert calls.read_text().split() == [gpu0]
    d.wait_for(lambda s: s["gpus"][0]["state"] == "healthy", timeout_s=5, what="GPU 0 back after probation")
    resets = d.events("gpu_reset")
    assert [e["ok"] for e in resets] == [True] and resets[0]["gpu"] == gpu0
    included = d.events("gpu_included")
    assert included and included[-1]["gpu"] == gpu0
    assert d.ctl("healthy", "--format", "index").stdout.strip() == "0,1"


def test_a_job_ignoring_the_signal_is_killed_with_its_other_session(setup: Setup) -> None:
    d = setup.daemon()
    work = setup.workdir()
    run_trainer(d, "deaf", work, "--ignore-signal", "--child-session")
    first = running_attempt(d, "deaf", work)
    assert psutil.pid_exists(first["grandchild"])
    assert psutil.Process(first["grandchild"]).pid == os.getsid(first["grandchild"])  # its own session
    d.ctl("inject", "0", "xid", "79")
    wait_until(lambda: attempts(work)[1:], GRACE_S + 5, "the second attempt")
    assert gone(first["pid"]) and gone(first["grandchild"])
    # it does not catch the checkpoint signal: no grace is waited out for a checkpoint that cannot come
    assert "checkpoint_unsupported" in d.kinds(job="deaf")
    done = d.events("job_stopping_done", job="deaf")
    assert done and "SIGKILL" in done[-1]["message"]


def test_a_truncated_checkpoint_is_rejected_and_the_previous_snapshot_used(setup: Setup) -> None:
    d = setup.daemon()
    work = setup.workdir()
    run_trainer(d, "torn", work, "--truncate-on-signal", "--every", "20")  # slower than the watcher's settle time
    running_attempt(d, "torn", work)
    snaps = wait_until(lambda: json.loads(d.ctl("snapshots", "torn", "--json").stdout), 6, "a first snapshot")
    d.ctl("inject", "0", "xid", "13")
    second = running_attempt(d, "torn", work, attempt=2)
    os.kill(second["pid"], signal.SIGSTOP)  # our own trainer: its next save (every 20 steps) would replace ck.pt
    resume = Path(second["env"]["GPUGUARD_RESUME_FROM"])
    valid = {s["path"] for s in json.loads(d.ctl("snapshots", "torn", "--json").stdout)}
    assert str(resume) in valid and snaps[0]["path"] in valid
    step = read_step(resume)
    assert step == second["start_step"] and step % 20 == 0 and step > 0
    torn = work / "ck.pt"
    assert torn.is_file()
    try:
        saved_over = read_step(torn)
    except zipfile.BadZipFile:  # the trainer's own file is torn
        pass
    else:  # only if attempt 2 reached its next save before it was stopped: a whole, later file
        assert saved_over >= step + 20, saved_over
    rejected = d.events("snapshot_rejected", job="torn")
    assert rejected and "truncated or corrupt zip" in rejected[-1]["message"]


def test_a_crash_loop_backs_off_then_fails(setup: Setup) -> None:
    d = setup.daemon("[jobs]\nbackoff_initial_s = 0.2\nbackoff_max_s = 1\n")
    work = setup.workdir()
    run_trainer(d, "loop", work, "--crash", max_restarts=3)
    d.wait_for(lambda s: s["jobs"][0]["state"] == "failed", timeout_s=10, what="the job failed")
    evs = d.events(job="loop")
    crashed = [e for e in evs if e["kind"] == "job_crashed"]
    assert [e["backoff_s"] for e in crashed] == [0.2, 0.4, 0.8]
    failed = [e for e in evs if e["kind"] == "job_failed"]
    assert len(failed) == 1
    assert "gave up after 3 crash restart(s)" in failed[0]["message"] and "exit 1" in failed[0]["message"]
    assert "simulated crash" in failed[0]["output_tail"]
    assert len(attempts(work)) == 4
    job = d.job("loop")
    assert job["restarts"] == 3 and job["gpus"] == [] and job["pid"] is None
    assert d.gpu(0)["jobs"] == []


def test_a_job_waits_for_a_healthy_gpu(setup: Setup) -> None:
    d = setup.daemon()
    work = setup.workdir()
    d.ctl("exclude", "0")
    d.ctl("exclude", "1")
    run_trainer(d, "patient", work)
    assert d.job("patient")["state"] == "waiting"
    assert "job_waiting" in d.kinds(job="patient")
    d.polls_after(time.time())  # ticks that found no GPU for it
    assert attempts(work) == [] and d.job("patient")["state"] == "waiting"
    d.ctl("include", "1")
    first = running_attempt(d, "patient", work)
    assert first["env"]["CUDA_VISIBLE_DEVICES"] == d.gpu(1)["uuid"]
    assert d.kinds(job="patient").count("job_waiting") == 1


@pytest.mark.slow
def test_a_restarted_daemon_adopts_its_job(setup: Setup) -> None:
    d = setup.daemon()
    work = setup.workdir()
    run_trainer(d, "kept", work, "--finish-after", "200")  # 10 s: it must outlive a slow daemon restart
    first = running_attempt(d, "kept", work)
    wrapper = d.job("kept")["pid"]
    d.stop(signal.SIGKILL)
    assert not gone(first["pid"])
    d.start()
    job = d.job("kept")
    assert job["state"] == "running" and job["pid"] == wrapper and not gone(first["pid"])
    assert "job_adopted" in d.kinds(job="kept")
    d.wait_for(lambda s: s["jobs"][0]["state"] == "succeeded", timeout_s=30, what="the adopted job succeeded")
    assert d.kinds(job="kept").count("job_succeeded") == 1
    assert d.gpu(0)["jobs"] == []


def test_a_job_that_ended_without_a_daemon_is_recorded(setup: Setup) -> None:
    d = setup.daemon()
    work = setup.workdir()
    run_trainer(d, "orphan", work, "--finish-after", "10")
    first = running_attempt(d, "orphan", work)
    d.stop(signal.SIGKILL)
    wait_until(lambda: gone(first["pid"]), 5, "the job's end")
    wait_until(lambda: (d.state_dir / "jobs" / "orphan" / "exit-status").exists(), 5, "the wrapper's exit status")
    d.start()
    d.wait_for(lambda s: s["jobs"][0]["state"] == "succeeded", timeout_s=3, what="the job recorded as succeeded")
    done = d.events("job_succeeded", job="orphan")
    assert len(done) == 1 and "not running" in done[0]["message"]


def test_stop_ends_the_whole_tree_and_frees_the_gpu(setup: Setup) -> None:
    d = setup.daemon()
    work = setup.workdir()
    run_trainer(d, "halt", work, "--child-session")
    first = running_attempt(d, "halt", work)
    wrapper = d.job("halt")["pid"]
    assert d.gpu(0)["jobs"] == ["halt"]
    d.ctl("stop", "halt")
    d.wait_for(lambda s: s["jobs"][0]["state"] == "stopped", timeout_s=GRACE_S + 5, what="the job stopped")
    for pid in (wrapper, first["pid"], first["grandchild"]):
        assert gone(pid), pid
    job = d.job("halt")
    assert job["gpus"] == [] and job["pid"] is None
    assert all(g["jobs"] == [] for g in d.status()["gpus"])
    assert "job_stopped" in d.kinds(job="halt")
    assert len(attempts(work)) == 1


# ---------------------------------------------------------------- privileges


JOB = "import json, os; open('uid.json', 'w').write(json.dumps({'uid': os.getuid(), 'gid': os.getgid()}))"


@pytest.mark.root
def test_run_from_an_unprivileged_user_runs_as_that_user(nobody_python: str, open_dir: Path, setup: Setup) -> None:
    setup.tmp = open_dir  # the socket must be reachable by nobody
    group = grp.getgrgid(NOBODY.pw_gid).gr_name
    d = setup.daemon(daemon_keys=f'admin_group = "{group}"\n')
    work = setup.workdir()
    work.chmod(0o1777)
    done = as_nobody([
        nobody_python, "-c", "import sys; from gpuguard.ctl import main; sys.exit(main())",
        "--socket", str(d.socket), "run", "--name", "mine", "--workdir", str(work),
        "--", nobody_python, "-c", JOB,
    ])
    assert done.returncode == 0, done.stderr
    d.wait_for(lambda s: s["jobs"][0]["state"] == "succeeded", timeout_s=10, what="nobody's job finished")
    assert json.loads((work / "uid.json").read_text()) == {"uid": NOBODY.pw_uid, "gid": NOBODY.pw_gid}
    assert d.job("mine")["user"] == "nobody"
