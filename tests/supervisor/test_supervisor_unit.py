"""The Supervisor on fakes of its ports (issue #12): no daemon, real short jobs.

Each test builds a Supervisor over a FakePool, FakeRecords and an event list,
runs a `python -c` job from its own tmp dir and ticks with hand-made facts
until the job reaches the state the scenario expects. Every state move is
checked against the table (an illegal one fails the test even where the tick
swallowed it), and every process a test started is killed at teardown.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from gpuguard.events import EventKind
from gpuguard.health.types import Action
from gpuguard.supervisor import runner as runner_mod
from gpuguard.supervisor.job import Job
from gpuguard.supervisor.jobspec import JobError
from gpuguard.supervisor.states import FINAL, JobEvent, JobState

from .fakes import GPU0, GPU1, MoveLog, Node, faulted, gone, tree_of, two_gpus, wait_for

pytestmark = pytest.mark.e2e

S, E = JobState, JobEvent
SLEEP = "import time; time.sleep(30)"


@pytest.fixture
def node(tmp_path: Path, watched: Callable[[Node], Node]) -> Node:
    return watched(Node(tmp_path))


def test_submit_starts_the_job_on_gpu0(node: Node) -> None:
    """Placed on the first free GPU, the pool told, the record saved, job_started written."""
    sup = node.supervisor()
    job = node.submit(sup, "j", SLEEP)
    assert job.state == S.RUNNING
    assert job.attempt.gpus == [GPU0]
    assert node.pool.called("occupied") == [(GPU0, job.attempt.pid)]
    saved = node.records.saved["j"]
    assert saved["state"] == "running" and saved["attempt"]["pid"] == job.attempt.pid
    assert [(e.kind, e.job) for e in node.log.events] == [(EventKind.JOB_STARTED, "j")]
    (view,) = sup.view()
    assert view["gpus"] == [GPU0] and view["pid"] == job.attempt.pid and view["state"] == "running"


@pytest.mark.parametrize("action", [Action.RESET_GPU, Action.REBOOT_NODE])
def test_fault_checkpoints_and_moves_the_job(node: Node, moves: MoveLog, action: Action) -> None:
    """A faulted GPU: checkpoint asked, GPU excluded, job restarted on GPU 1; a reset or the node hook per action."""
    sup = node.supervisor()
    job = node.submit(sup, "j", SLEEP)
    first_pid = job.attempt.pid
    node.facts = faulted(node.facts, GPU0, action)
    node.tick_until(sup, lambda: job.state == S.RUNNING and job.attempt.number == 2, "the restart on GPU 1")
    assert job.attempt.gpus == [GPU1]
    (asked,) = node.log.of(EventKind.CHECKPOINT_REQUESTED)
    assert asked.job == "j" and asked.gpu == GPU0
    assert [c[0] for c in node.pool.called("exclude")] == [GPU0]
    resets, hooks = node.pool.called("reset_when_free"), node.pool.called("node_unhealthy")
    if action == Action.RESET_GPU:
        assert [c[0] for c in resets] == [GPU0] and hooks == []
    else:
        assert resets == [] and len(hooks) == 1
    assert (GPU0, first_pid) in node.pool.called("vacated")
    assert node.pool.called("occupied")[-1] == (GPU1, job.attempt.pid) != (GPU1, first_pid)
    assert (S.RUNNING, E.FAULT, S.CHECKPOINTING) in moves.moves
    kinds = node.log.kinds("j")
    assert kinds.index(EventKind.CHECKPOINT_REQUESTED) < kinds.index(EventKind.JOB_RESTARTED)
    assert node.records.saved["j"]["attempt"]["gpus"] == [GPU1]


# a trainer's side of the handshake: on SIGUSR1 it "saves" and exits with {code}
HANDLER = (
    "import os, signal, sys, time\n"
    "signal.signal(signal.SIGUSR1, lambda *_: sys.exit({code}))\n"
    "open(os.environ['GPUGUARD_HEARTBEAT'] + '.ready', 'w').close()\n"
    "time.sleep(30)\n"
)


@pytest.mark.parametrize(("code", "state", "gpus"), [(75, S.RUNNING, [GPU1]), (0, S.SUCCEEDED, [])])
def test_fault_handshake(node: Node, code: int, state: JobState, gpus: list[str]) -> None:
    """Exit 75 on the checkpoint signal: restarted on GPU 1, not a crash; exit 0: the job is done."""
    sup = node.supervisor()
    job = node.submit(sup, "j", HANDLER.format(code=code))
    ready = sup.files.heartbeat("j").with_name("heartbeat.ready")
    wait_for(ready.exists, "the job's signal handler")
    node.facts = faulted(node.facts, GPU0)
    node.tick_until(sup, lambda: job.state == state and job.attempt.number == (2 if code else 1), f"the job to be {state}")
    assert job.attempt.gpus == gpus and job.attempt.crashes == 0
    assert [c[0] for c in node.pool.called("reset_when_free")] == [GPU0]
    assert EventKind.JOB_CRASHED not in node.log.kinds("j")


def test_stop_during_a_fault_checkpoint_ends_stopped(node: Node) -> None:
    """An operator's stop while the fault's stop runs: the job ends stopped, not restarted."""
    sup = node.supervisor()
    job = node.submit(sup, "j", SLEEP)
    node.facts = faulted(node.facts, GPU0)
    sup.tick(0.0, node.facts)  # the fault: the stop for the restart begins on its thread
    assert job.state in (S.CHECKPOINTING, S.STOPPING) and job.rt.stopping is not None
    sup.stop("j", "test")
    node.tick_until(sup, lambda: job.state in FINAL, "the stop")
    assert job.state == S.STOPPED and job.attempt.number == 1
    assert [c[0] for c in node.pool.called("reset_when_free")] == [GPU0]  # the fault's reset still happens


def test_a_fault_is_acted_on_once(node: Node) -> None:
    """The restarted attempt on GPU 1 is not moved again for the old fault on GPU 0."""
    sup = node.supervisor()
    job = node.submit(sup, "j", SLEEP)
    node.facts = faulted(node.facts, GPU0)
    node.tick_until(sup, lambda: job.state == S.RUNNING and job.attempt.number == 2, "the restart")
    for _ in range(5):
        sup.tick(0.0, node.facts)  # a clock at 0: no hang can be found, only faults
    assert job.state == S.RUNNING and job.attempt.number == 2
    assert len(node.pool.called("exclude")) == 1


def test_exit_0_succeeds_and_frees_its_gpu(node: Node) -> None:
    sup = node.supervisor()
    job = node.submit(sup, "j", "pass")
    pid = job.attempt.pid
    node.tick_until(sup, lambda: job.state in FINAL, "the job to end")
    assert job.state == S.SUCCEEDED and job.attempt.exit_code == 0
    assert job.attempt.gpus == [] and job.rt.proc is None
    assert node.pool.called("vacated") == [(GPU0, pid)]
    assert EventKind.JOB_SUCCEEDED in node.log.kinds("j")
    assert sup.jobs_on(GPU0) == []
    other = node.submit(sup, "k", SLEEP)  # GPU 0 is free again
    assert other.attempt.gpus == [GPU0]


def test_exit_3_with_no_restarts_left_fails(node: Node) -> None:
    sup = node.supervisor()
    job = node.submit(sup, "j", "raise SystemExit(3)", max_restarts=0)
    node.tick_until(sup, lambda: job.state in FINAL, "the job to end")
    assert job.state == S.FAILED and job.attempt.exit_code == 3
    assert job.attempt.reason is not None and "exit 3" in job.attempt.reason
    (failed,) = node.log.of(EventKind.JOB_FAILED)
    assert "exit 3" in failed.message
    assert job.attempt.gpus == [] and node.records.saved["j"]["state"] == "failed"


def test_exit_3_with_restarts_left_backs_off_and_restarts(node: Node, moves: MoveLog) -> None:
    sup = node.supervisor()
    job = node.submit(sup, "j", "import os, sys, time\nif os.environ['GPUGUARD_ATTEMPT'] == '1': sys.exit(3)\ntime.sleep(30)")
    node.tick_until(sup, lambda: job.state == S.RUNNING and job.attempt.number == 2, "the second attempt")
    assert (S.RUNNING, E.CRASHED, S.BACKOFF) in moves.moves and (S.BACKOFF, E.BACKOFF_OVER, S.STARTING) in moves.moves
    assert EventKind.JOB_CRASHED in node.log.kinds("j") and job.attempt.restarts == 1


def test_stop_ends_the_whole_tree(node: Node) -> None:
    sup = node.supervisor()
    job = node.submit(sup, "j", SLEEP)
    pid = job.attempt.pid
    tree = tree_of(job)
    assert len(tree) >= 2  # the wrapper and the job itself
    assert sup.stop("j", "test").state == S.STOPPING
    node.tick_until(sup, lambda: job.state in FINAL, "the stop")
    assert job.state == S.STOPPED
    (stopped,) = node.log.of(EventKind.JOB_STOPPED)
    assert stopped.job == "j"
    assert gone(tree)
    assert node.pool.called("vacated") == [(GPU0, pid)]
    assert node.records.saved["j"]["state"] == "stopped"
    assert sup.stop("j", "test again").state == S.STOPPED  # stopping a stopped job changes nothing


def test_hang_on_idle_gpus_restarts_the_job(node: Node, moves: MoveLog) -> None:
    """No heartbeat, no CPU, GPUs idle past the limit: hang event, the pool told, a new attempt."""
    node.facts = two_gpus(util=0.0)
    sup = node.supervisor()
    job = node.submit(sup, "j", SLEEP, max_restarts=50)
    node.tick_until(sup, lambda: job.state == S.RUNNING and job.attempt.number >= 2, "a restart after the hang")
    hang = node.log.of(EventKind.HANG)[0]
    assert hang.job == "j" and hang.gpu == GPU0
    assert node.pool.called("job_hung")[0] == (("j", (GPU0,)),)
    assert (S.RUNNING, E.HANG, S.CHECKPOINTING) in moves.moves
    assert EventKind.JOB_RESTARTED in node.log.kinds("j")
    assert node.pool.called("exclude") == []  # a hang alone takes no GPU out: the pool decides


def test_a_new_supervisor_adopts_a_running_job(node: Node) -> None:
    """Same records and dirs, the process still running: found again, same pid, and it can be stopped."""
    first = node.supervisor()
    old = node.submit(first, "j", SLEEP)
    pid = old.attempt.pid
    first.close()  # the daemon goes; its job stays
    second = node.supervisor()
    job = second.jobs["j"]
    assert job is not old
    assert job.state == S.RUNNING and job.attempt.pid == pid and job.rt.proc is not None
    assert job.attempt.gpus == [GPU0]
    (adopted,) = node.log.of(EventKind.JOB_ADOPTED)
    assert adopted.job == "j" and str(pid) in adopted.message
    assert node.pool.called("occupied") == [(GPU0, pid), (GPU0, pid)]
    tree = tree_of(job)
    second.stop("j", "test")
    node.tick_until(second, lambda: job.state in FINAL, "the adopted job to stop")
    assert job.state == S.STOPPED and gone(tree)


@pytest.mark.parametrize("code", [0, 3, 75])
def test_a_job_that_ended_while_no_supervisor_ran(node: Node, tmp_path: Path, code: int) -> None:
    """Its exit status is read from the wrapper's file: exit 0 succeeds, exit 3 backs off and
    restarts, exit 75 (perhaps the old daemon's checkpoint signal) restarts at once."""
    flag = tmp_path / "end-now"
    script = (
        "import os, sys, time\n"
        "if os.environ['GPUGUARD_ATTEMPT'] != '1': time.sleep(30)\n"
        f"while not os.path.exists({str(flag)!r}): time.sleep(0.02)\n"
        f"sys.exit({code})\n"
    )
    first = node.supervisor()
    old = node.submit(first, "j", script, max_restarts=2)
    first.close()
    flag.touch()
    assert old.rt.proc is not None and old.rt.proc.wait(10) == code  # ended (and reaped) while no one watched
    second = node.supervisor()
    job = second.jobs["j"]
    assert job.attempt.exit_code == code
    if code == 0:
        assert job.state == S.SUCCEEDED
        (done,) = node.log.of(EventKind.JOB_SUCCEEDED)
        assert "not running" in done.message
        return
    if code == 3:
        assert job.state == S.BACKOFF and EventKind.JOB_CRASHED in node.log.kinds("j")
    else:
        assert job.state == S.RUNNING and EventKind.JOB_CRASHED not in node.log.kinds("j")
    node.tick_until(second, lambda: job.state == S.RUNNING and job.attempt.number == 2, "the restart")
    assert job.attempt.gpus == [GPU0] and job.attempt.restarts == 1


def test_a_stop_cut_short_by_a_daemon_restart_is_finished(node: Node) -> None:
    """A record saved mid-checkpoint (the daemon died there) with its process alive: the new
    supervisor adopts it, finishes the stop without a checkpoint and restarts it."""
    first = node.supervisor()
    old = node.submit(first, "j", SLEEP)
    first.close()
    rec = node.records.saved["j"]
    rec["state"] = rec["attempt"]["state"] = "checkpointing"  # its purpose (after_stop) was not saved
    second = node.supervisor()
    job = second.jobs["j"]
    assert job.state == S.STOPPING and EventKind.JOB_ADOPTED in node.log.kinds("j")
    node.tick_until(second, lambda: job.state == S.RUNNING and job.attempt.number == 2, "the restart")
    assert job.attempt.pid != old.attempt.pid and job.attempt.gpus == [GPU0]


def test_waiting_for_a_gpu(node: Node) -> None:
    """No healthy GPU: the job waits (no process), and starts once one is back."""
    healthy = node.facts
    node.facts = faulted(faulted(healthy, GPU0), GPU1)
    sup = node.supervisor()
    job = node.submit(sup, "j", SLEEP)
    assert job.state == S.WAITING and job.rt.proc is None and node.pool.calls == []
    assert node.log.kinds("j") == [EventKind.JOB_WAITING]
    assert node.records.saved["j"]["state"] == "waiting"
    node.facts = faulted(healthy, GPU0)
    node.tick_until(sup, lambda: job.state == S.RUNNING, "the start on GPU 1")
    assert job.attempt.gpus == [GPU1]


def test_stop_in_backoff_needs_no_process(node: Node) -> None:
    node.settings = replace(node.settings, backoff_initial_s=60.0, backoff_max_s=60.0)
    sup = node.supervisor()
    job = node.submit(sup, "j", "raise SystemExit(3)")
    node.tick_until(sup, lambda: job.state == S.BACKOFF, "the crash")
    assert sup.stop("j", "test").state == S.STOPPED
    assert EventKind.JOB_STOPPED in node.log.kinds("j") and node.records.saved["j"]["state"] == "stopped"


def test_full_disk_refuses_the_job_and_starts_nothing(node: Node) -> None:
    sup = node.supervisor()
    node.records.full = True
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(JobError, match="could not be saved"):
        node.submit(sup, "j", SLEEP)
    assert "j" not in sup.jobs
    assert {p.pid for p in psutil.Process().children(recursive=True)} == before
    assert node.pool.calls == [] and node.log.events == [] and node.records.saved == {}
    node.records.full = False
    assert node.submit(sup, "j", SLEEP).state == S.RUNNING  # the name was not left taken


def test_full_disk_keeps_the_old_job_of_that_name(node: Node) -> None:
    """A finished job's name may be reused; a refused reuse leaves the finished job as it was."""
    sup = node.supervisor()
    old = node.submit(sup, "j", "pass")
    node.tick_until(sup, lambda: old.state in FINAL, "the first job to end")
    node.records.full = True
    with pytest.raises(JobError):
        node.submit(sup, "j", SLEEP)
    assert sup.jobs["j"] is old and old.state == S.SUCCEEDED


def test_records_saved_by_the_supervisor_load_back(node: Node) -> None:
    """What put_job got (through JSON) is the job: Job.from_record(job.record()) round-trips."""
    sup = node.supervisor()
    job = node.submit(sup, "j", SLEEP, gpus=2, min_gpus=1, env={"A": "1"})
    loaded = Job.from_record(node.records.saved["j"])
    assert loaded.spec == job.spec and loaded.attempt == job.attempt
    assert job.attempt.gpus == [GPU0, GPU1]


def test_every_move_of_a_job_life_is_in_the_table(node: Node, moves: MoveLog) -> None:
    """start, fault, stop for the restart, start again, operator stop: all legal, all recorded."""
    sup = node.supervisor()
    job = node.submit(sup, "j", SLEEP)
    node.facts = faulted(node.facts, GPU0)
    node.tick_until(sup, lambda: job.attempt.number == 2 and job.state == S.RUNNING, "the restart")
    sup.stop("j", "test")
    node.tick_until(sup, lambda: job.state in FINAL, "the stop")
    path = [m[0] for m in moves.moves] + [moves.moves[-1][2]]
    assert path[0] == S.STARTING and path[-1] == S.STOPPED
    assert S.CHECKPOINTING in path and S.STOPPING in path
    assert moves.illegal == []
    assert os.path.exists(sup.files.log("j"))


def test_unasked_exit_75_backs_off_and_counts_toward_max_restarts(node: Node, moves: MoveLog) -> None:
    """A job that keeps exiting 75 by itself gives up after max_restarts, like any crash loop."""
    sup = node.supervisor()
    job = node.submit(sup, "j", "raise SystemExit(75)", max_restarts=1)
    node.tick_until(sup, lambda: job.state in FINAL or job.attempt.number > 3, "the job to give up")
    assert job.state == S.FAILED and job.attempt.number == 2
    assert (S.RUNNING, E.RESTART_REQUESTED, S.BACKOFF) in moves.moves
    assert EventKind.JOB_CRASHED not in node.log.kinds("j")


def test_a_job_that_does_not_handle_the_checkpoint_signal_gets_sigterm(node: Node) -> None:
    """`time.sleep` leaves SIGUSR1 at its default action (death): not sent it, SIGTERM instead, and an event says so."""
    sup = node.supervisor()
    job = node.submit(sup, "j", SLEEP)
    node.facts = faulted(node.facts, GPU0)
    node.tick_until(sup, lambda: job.state == S.RUNNING and job.attempt.number == 2, "the restart on GPU 1")
    assert EventKind.CHECKPOINT_UNSUPPORTED in node.log.kinds("j")
    assert job.attempt.exit_code == -signal.SIGTERM


def test_fault_restarts_have_their_own_budget_and_back_off(node: Node, moves: MoveLog) -> None:
    """A restart-the-app Xid after each start: the first move is at once, later ones back off,
    and after max_restarts fault restarts the job fails; crashes are not charged for them."""
    sup = node.supervisor()
    job = node.submit(sup, "j", HANDLER.format(code=75), max_restarts=2)
    for n in (1, 2, 3):
        ready = sup.files.heartbeat("j").with_name("heartbeat.ready")
        wait_for(lambda: job.attempt.number == n and ready.exists(), f"attempt {n}'s handler")
        ready.unlink()
        xid = replace(node.facts[GPU0], app_xids=((13, float(n)),))  # a new restart-the-app Xid on its GPU
        node.facts = dict(node.facts) | {GPU0: xid}
        node.tick_until(sup, lambda: job.attempt.number == n + 1 or job.state in FINAL, f"the restart after Xid {n}")
    assert job.state == S.FAILED and "max_restarts 2" in (job.attempt.reason or "")
    assert job.attempt.restarts_by == {"fault": 2}
    assert (S.STOPPING, E.RESTART_DELAYED, S.BACKOFF) in moves.moves


def test_a_restart_on_the_same_gpu_waits_until_nvml_no_longer_lists_the_old_attempt(node: Node) -> None:
    sup = node.supervisor()
    job = node.submit(sup, "j", HANDLER.format(code=75))
    ready = sup.files.heartbeat("j").with_name("heartbeat.ready")
    wait_for(ready.exists, "the job's signal handler")
    old = job.attempt.pid
    assert old is not None
    held = replace(node.facts[GPU0], holders=(old,), app_xids=((13, 1.0),))  # NVML lists it; a restart-the-app Xid
    node.facts = dict(node.facts) | {GPU0: held}
    node.tick_until(sup, lambda: job.rt.release_wait_since is not None, "the restart to wait for GPU 0")
    for _ in range(5):
        sup.tick(time.time(), node.facts)
    assert job.attempt.number == 1 and node.pool.called("refresh")
    node.facts = dict(node.facts) | {GPU0: replace(held, holders=())}  # the driver let go
    node.tick_until(sup, lambda: job.attempt.number == 2 and job.state == S.RUNNING, "the restart on GPU 0")
    assert job.attempt.gpus == [GPU0] and EventKind.GPU_NOT_RELEASED not in node.log.kinds("j")


def test_the_wait_for_a_gpu_to_be_released_is_bounded(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner_mod, "RELEASE_WAIT_S", 0.3)
    sup = node.supervisor()
    job = node.submit(sup, "j", HANDLER.format(code=75))
    wait_for(sup.files.heartbeat("j").with_name("heartbeat.ready").exists, "the job's signal handler")
    held = replace(node.facts[GPU0], holders=(job.attempt.pid or 0,), app_xids=((13, 1.0),))
    node.facts = dict(node.facts) | {GPU0: held}
    node.tick_until(sup, lambda: job.attempt.number == 2 and job.state == S.RUNNING, "the restart after the bound")
    event = node.log.of(EventKind.GPU_NOT_RELEASED)[0]
    assert "starting anyway" in event.message and f"pid {held.holders[0]} on GPU 0" in event.message


LEAVES_A_CHILD = (
    "import os, subprocess, sys\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import os, time; os.setsid(); time.sleep(60)'])\n"
    "open(os.environ['GPUGUARD_HEARTBEAT'] + '.child', 'w').write(str(child.pid))\n"
    "sys.exit(0)\n"
)


def test_what_an_attempt_leaves_behind_when_it_ends_is_stopped(node: Node) -> None:
    """A job exits 0 but left a child in its own session: it must not outlive the job."""
    sup = node.supervisor()
    job = node.submit(sup, "j", LEAVES_A_CHILD)
    marker = sup.files.heartbeat("j").with_name("heartbeat.child")
    node.tick_until(sup, lambda: job.state in FINAL, "the job's end")
    assert job.state == S.SUCCEEDED
    child = int(marker.read_text())
    wait_for(lambda: not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE, "the child's end")
    stopped = node.log.of(EventKind.JOB_LEFTOVERS_STOPPED)
    assert stopped and str(child) in stopped[0].message


def test_no_attempt_starts_before_its_record_is_saved(node: Node) -> None:
    """On a full disk a restart is held back: an attempt the record does not know could run twice."""
    sup = node.supervisor()
    job = node.submit(sup, "j", "raise SystemExit(3)", max_restarts=5)
    node.tick_until(sup, lambda: job.state == S.BACKOFF, "the crash")
    node.records.full = True
    for _ in range(20):
        sup.tick(time.time() + 60, node.facts)  # the backoff is over
    assert job.attempt.number == 1 and job.rt.proc is None
    node.records.full = False
    node.tick_until(sup, lambda: job.attempt.number == 2, "the restart once the record saves")


def test_an_attempt_the_record_did_not_know_is_stopped_by_the_next_supervisor(node: Node) -> None:
    """The daemon died between spawning an attempt and saving it: the new one must not run it twice."""
    first = node.supervisor()
    job = node.submit(first, "j", SLEEP)
    wrapper = job.attempt.pid
    assert wrapper is not None
    record = json.loads(json.dumps(job.record()))
    record["attempt"] |= {"state": "starting", "pid": None, "start_time": None}  # as saved before the spawn
    node.records.saved["j"] = record
    second = node.supervisor()
    again = second.jobs["j"]
    node.tick_until(second, lambda: again.state == S.RUNNING, "the new attempt")
    assert again.attempt.pid != wrapper
    wait_for(lambda: not psutil.pid_exists(wrapper) or psutil.Process(wrapper).status() == psutil.STATUS_ZOMBIE, "the stray's end")
    assert EventKind.JOB_LEFTOVERS_STOPPED in node.log.kinds("j")
