"""The supervisor end to end: a real gpuguardd --simulate 2 driving the scripted
trainer (jobs/trainer.py) through gpuguardctl, as CONTRACT.md's "What a
managed job gets" promises."""

from __future__ import annotations

import grp
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from harness import NOBODY, DaemonProc, as_nobody, gone, wait_until

from .jobs.trainer import ATTEMPTS, read_step

TRAINER = Path(__file__).with_name("jobs") / "trainer.py"
GRACE_S = 2.0
FAST = f"[jobs]\ncheckpoint_grace_s = {GRACE_S}\nstop_timeout_s = 0.5\n"


# ---------------------------------------------------------------- helpers




def attempts(workdir: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in (workdir / ATTEMPTS).read_text().splitlines()]
    except FileNotFoundError:
        return []


def events(d: DaemonProc, job: str | None = None) -> list[dict[str, Any]]:
    args = ["events", "--json", "--limit", "1000"] + (["--job", job] if job else [])
    return json.loads(d.ctl(*args).stdout)


def kinds(d: DaemonProc, job: str | None = None) -> list[str]:
    return [e["kind"] for e in events(d, job)]


def job_view(d: DaemonProc, name: str) -> dict[str, Any]:
    return next(j for j in d.status()["jobs"] if j["name"] == name)


def uuid_of(d: DaemonProc, index: int) -> str:
    return d.gpu(index)["uuid"]


def polls_after(d: DaemonProc, moment: float, polls: int = 3) -> None:
    """Wait until the daemon's main loop has polled `polls` times after `moment`. Each
    poll is followed by an evaluation and a supervisor tick, so once the next poll is
    seen that tick is done: what the daemon would do about the state at `moment`, it
    has done. A negative assert after this is about the daemon, not about a sleep."""
    seen = moment
    for _ in range(polls):
        seen = wait_until(
            lambda: (t := d.status()["daemon"]["last_poll_at"]) is not None and t > seen and t, 10, f"a poll after {seen}"
        )  # fmt: skip




def run_trainer(d: DaemonProc, name: str, workdir: Path, *flags: str, max_restarts: int | None = None) -> None:
    extra = ["--max-restarts", str(max_restarts)] if max_restarts is not None else []
    d.ctl(
        "run", "--name", name, "--checkpoint", "ck.pt", "--workdir", str(workdir), *extra,
        "--", sys.executable, str(TRAINER), *flags,
    )


def running_attempt(d: DaemonProc, name: str, workdir: Path, attempt: int = 1) -> dict[str, Any]:
    """Wait until the job's given attempt runs and has recorded itself."""
    d.wait_for(
        lambda s: any(j["name"] == name and j["state"] == "running" and j["attempt"] == attempt for j in s["jobs"]),
        timeout_s=10,
        what=f"{name} attempt {attempt} running",
    )
    recorded = wait_until(lambda: attempts(workdir)[attempt - 1 :], 10, f"{name} attempt {attempt} recorded")
    return recorded[0]


def _kill_leftovers(workdirs: list[Path]) -> None:
    """Jobs outlive their daemon by design: end the trainers (and grandchildren) the test started."""
    for workdir in workdirs:
        for rec in attempts(workdir):
            for pid in (rec["pid"], rec.get("grandchild")):
                try:
                    proc = psutil.Process(pid)
                    if any("trainer" in a or "SIG_IGN" in a for a in proc.cmdline()):
                        proc.kill()
                except (psutil.Error, TypeError):
                    continue


class Setup:
    """One daemon per test, plus the job workdirs to clean up after it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.daemons: list[DaemonProc] = []
        self.workdirs: list[Path] = []

    def daemon(self, extra_config: str = FAST, daemon_keys: str = "") -> DaemonProc:
        d = DaemonProc(self.tmp, gpus=2, extra_config=extra_config)
        if daemon_keys:  # DaemonProc writes the [daemon] table itself; TOML allows it once
            d.config.write_text(d.config.read_text().replace("[daemon]\n", "[daemon]\n" + daemon_keys, 1))
        d.start()
        self.daemons.append(d)
        return d

    def workdir(self, name: str = "work", base: Path | None = None) -> Path:
        path = (base or self.tmp) / name
        path.mkdir()
        self.workdirs.append(path)
        return path


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path)
    try:
        yield s
    finally:
        _kill_leftovers(s.workdirs)
        for d in s.daemons:
            if d.proc is not None:
                d.stop()


# ---------------------------------------------------------------- the contract


def test_xid_79_moves_the_job_to_the_other_gpu(setup: Setup) -> None:
    d = setup.daemon()
    work = setup.workdir()
    run_trainer(d, "j79", work)
    first = running_attempt(d, "j79", work)
    gpu0, gpu1 = uuid_of(d, 0), uuid_of(d, 1)
    assert first["env"]["CUDA_VISIBLE_DEVICES"] == gpu0
    assert first["env"]["GPUGUARD_ATTEMPT"] == "1" and "GPUGUARD_RESUME_FROM" not in first["env"]
    assert first["env"]["GPUGUARD_JOB"] == "j79" and first["env"]["GPUGUARD_CHECKPOINT_SIGNAL"] == "SIGUSR1"
    time.sleep(0.3)  # a few steps

    injected = time.monotonic()
    d.ctl("inject", "0", "xid", "79")
    second = wait_until(lambda: attempts(work)[1:], GRACE_S + 2, "the second attempt")[0]
    assert time.monotonic() - injected < GRACE_S + 2

    env = second["env"]
    assert env["GPUGUARD_ATTEMPT"] == "2"
    assert env["CUDA_VISIBLE_DEVICES"] == gpu1
    resume = Path(env["GPUGUARD_RESUME_FROM"])
    assert resume.is_absolute() and resume.is_relative_to(d.state_dir / "snapshots")
    assert read_step(resume) == second["start_step"] > 0
    job = job_view(d, "j79")
    assert job["exit_code"] == 75 and job["gpus"] == [gpu1] and job["restarts"] == 1
    assert d.gpu(0)["state"] == "excluded"
    seen = kinds(d)
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
    assert second["env"]["CUDA_VISIBLE_DEVICES"] == first["env"]["CUDA_VISIBLE_DEVICES"] == uuid_of(d, 0)
    polls_after(d, time.time(), polls=5)  # several ticks with the Xid still inside its window
    assert len(attempts(work)) == 2
    assert kinds(d, "j13").count("job_restarted") == 1
    assert job_view(d, "j13")["state"] == "running"
    assert d.gpu(0)["state"] == "healthy"


def test_an_xid_13_from_before_the_job_does_not_restart_it(setup: Setup) -> None:
    d = setup.daemon()
    work = setup.workdir()
    d.ctl("inject", "0", "xid", "13")
    d.wait_for(lambda s: s["gpus"][0]["findings"], timeout_s=3, what="the Xid 13 seen")
    run_trainer(d, "late", work)
    running_attempt(d, "late", work)
    polls_after(d, time.time(), polls=5)  # several ticks with the old Xid still inside its window
    assert len(attempts(work)) == 1 and "checkpoint_requested" not in kinds(d, "late")
    assert job_view(d, "late")["state"] == "running" and job_view(d, "late")["attempt"] == 1


def test_xid_95_resets_the_gpu_and_returns_it_after_probation(setup: Setup) -> None:
    script = setup.tmp / "reset.py"
    calls = setup.tmp / "reset-calls.txt"
    script.write_text(f"import sys\nwith open({str(calls)!r}, 'a') as f:\n    f.write(' '.join(sys.argv[1:]) + '\\n')\n")
    command = json.dumps([sys.executable, str(script), "{uuid}"])  # a JSON list of strings is a TOML array
    d = setup.daemon(FAST + f"[reset]\ncommand = {command}\nprobation_s = 1\n")
    work = setup.workdir()
    run_trainer(d, "j95", work)
    running_attempt(d, "j95", work)
    gpu0, gpu1 = uuid_of(d, 0), uuid_of(d, 1)
    d.ctl("inject", "0", "xid", "95")
    second = running_attempt(d, "j95", work, attempt=2)
    assert second["env"]["CUDA_VISIBLE_DEVICES"] == gpu1
    assert "gpu_excluded" in kinds(d)
    wait_until(lambda: calls.exists() and calls.read_text(), 5, "the reset command")
    assert calls.read_text().split() == [gpu0]
    d.wait_for(lambda s: s["gpus"][0]["state"] == "healthy", timeout_s=5, what="GPU 0 back after probation")
    resets = [e for e in events(d) if e["kind"] == "gpu_reset"]
    assert [e["ok"] for e in resets] == [True] and resets[0]["gpu"] == gpu0
    included = [e for e in events(d) if e["kind"] == "gpu_included"]
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
    assert "checkpoint_unsupported" in kinds(d, "deaf")
    done = [e for e in events(d, "deaf") if e["kind"] == "job_stopping_done"]
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
    rejected = [e for e in events(d, "torn") if e["kind"] == "snapshot_rejected"]
    assert rejected and "truncated or corrupt zip" in rejected[-1]["message"]


def test_a_crash_loop_backs_off_then_fails(setup: Setup) -> None:
    d = setup.daemon("[jobs]\nbackoff_initial_s = 0.2\nbackoff_max_s = 1\n")
    work = setup.workdir()
    run_trainer(d, "loop", work, "--crash", max_restarts=3)
    d.wait_for(lambda s: s["jobs"][0]["state"] == "failed", timeout_s=10, what="the job failed")
    evs = events(d, "loop")
    crashed = [e for e in evs if e["kind"] == "job_crashed"]
    assert [e["backoff_s"] for e in crashed] == [0.2, 0.4, 0.8]
    failed = [e for e in evs if e["kind"] == "job_failed"]
    assert len(failed) == 1
    assert "gave up after 3 crash restart(s)" in failed[0]["message"] and "exit 1" in failed[0]["message"]
    assert "simulated crash" in failed[0]["output_tail"]
    assert len(attempts(work)) == 4
    job = job_view(d, "loop")
    assert job["restarts"] == 3 and job["gpus"] == [] and job["pid"] is None
    assert d.gpu(0)["jobs"] == []


def test_a_job_waits_for_a_healthy_gpu(setup: Setup) -> None:
    d = setup.daemon()
    work = setup.workdir()
    d.ctl("exclude", "0")
    d.ctl("exclude", "1")
    run_trainer(d, "patient", work)
    assert job_view(d, "patient")["state"] == "waiting"
    assert "job_waiting" in kinds(d, "patient")
    polls_after(d, time.time())  # ticks that found no GPU for it
    assert attempts(work) == [] and job_view(d, "patient")["state"] == "waiting"
    d.ctl("include", "1")
    first = running_attempt(d, "patient", work)
    assert first["env"]["CUDA_VISIBLE_DEVICES"] == uuid_of(d, 1)
    assert kinds(d, "patient").count("job_waiting") == 1


def test_a_restarted_daemon_adopts_its_job(setup: Setup) -> None:
    d = setup.daemon()
    work = setup.workdir()
    run_trainer(d, "kept", work, "--finish-after", "200")  # 10 s: it must outlive a slow daemon restart
    first = running_attempt(d, "kept", work)
    wrapper = job_view(d, "kept")["pid"]
    d.stop(signal.SIGKILL)
    assert not gone(first["pid"])
    d.start()
    job = job_view(d, "kept")
    assert job["state"] == "running" and job["pid"] == wrapper and not gone(first["pid"])
    assert "job_adopted" in kinds(d, "kept")
    d.wait_for(lambda s: s["jobs"][0]["state"] == "succeeded", timeout_s=30, what="the adopted job succeeded")
    assert kinds(d, "kept").count("job_succeeded") == 1
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
    done = [e for e in events(d, "orphan") if e["kind"] == "job_succeeded"]
    assert len(done) == 1 and "not running" in done[0]["message"]


def test_stop_ends_the_whole_tree_and_frees_the_gpu(setup: Setup) -> None:
    d = setup.daemon()
    work = setup.workdir()
    run_trainer(d, "halt", work, "--child-session")
    first = running_attempt(d, "halt", work)
    wrapper = job_view(d, "halt")["pid"]
    assert d.gpu(0)["jobs"] == ["halt"]
    d.ctl("stop", "halt")
    d.wait_for(lambda s: s["jobs"][0]["state"] == "stopped", timeout_s=GRACE_S + 5, what="the job stopped")
    for pid in (wrapper, first["pid"], first["grandchild"]):
        assert gone(pid), pid
    job = job_view(d, "halt")
    assert job["gpus"] == [] and job["pid"] is None
    assert all(g["jobs"] == [] for g in d.status()["gpus"])
    assert "job_stopped" in kinds(d, "halt")
    assert len(attempts(work)) == 1


# ---------------------------------------------------------------- privileges


JOB = "import json, os; open('uid.json', 'w').write(json.dumps({'uid': os.getuid(), 'gid': os.getgid()}))"


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
    assert job_view(d, "mine")["user"] == "nobody"
