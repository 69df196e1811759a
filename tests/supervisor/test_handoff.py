"""Handing a job back to Slurm (issue #15): the pure decision (handoff.py), then
the Supervisor on fakes of its ports with a fake Scheduler and SnapshotStore.

The supervisor tests run real short `python -c` jobs from the test's tmp dir,
tick with hand-made facts, check every state move against the table and kill
what they started at teardown; no scontrol and no daemon are involved.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from gpuguard.events import EventKind
from gpuguard.health.types import Action, GpuState
from gpuguard.supervisor.handoff import REASON_MAX, Leave, batch_job, must_leave, one_line
from gpuguard.supervisor.job import Job
from gpuguard.supervisor.jobspec import JobError
from gpuguard.supervisor.ports import BatchJob, CommandResult, Facts, GpuFacts, NoStorage, Ports
from gpuguard.supervisor.states import JobEvent, JobState
from gpuguard.supervisor.supervisor import Supervisor

from .fakes import GPU0, GPU1, MoveLog, Node, faulted, gpu, two_gpus, wait_for

S, E = JobState, JobEvent
SLURM_ENV = {"SLURM_JOB_ID": "123", "SLURMD_NODENAME": "n1"}
XID79 = "Xid 79 (GPU has fallen off the bus)"

# a trainer: on SIGUSR1 it writes a (zip) checkpoint and exits 75, as the handshake asks
TRAINER = (
    "import os, signal, sys, time, zipfile\n"
    "def save(*_):\n"
    "    with zipfile.ZipFile('ckpt.pt', 'w') as z:\n"
    "        z.writestr('archive/data.pkl', b'weights' * 64)\n"
    "    sys.exit(75)\n"
    "signal.signal(signal.SIGUSR1, save)\n"
    "open(os.environ['GPUGUARD_HEARTBEAT'] + '.ready', 'w').close()\n"
    "time.sleep(30)\n"
)


# --- the decision, pure ------------------------------------------------------


def test_a_slurm_job_is_read_from_its_environment() -> None:
    user = (1000, 1000, (27,))
    assert batch_job(SLURM_ENV, user) == BatchJob("123", "n1", user)
    assert batch_job({"SLURM_JOB_ID": "123"}, None) == BatchJob("123", None, None)


@pytest.mark.parametrize("job_id", ["", "abc", "12 3", "123;reboot", "1,2", "-1", "12345678901", "１２３"])
def test_a_job_id_that_is_not_digits_is_no_slurm_job(job_id: str) -> None:
    """It would reach a command run as root: nothing but a plain job id counts."""
    assert batch_job({"SLURM_JOB_ID": job_id, "SLURMD_NODENAME": "n1"}, None) is None
    assert batch_job({"SLURMD_NODENAME": "n1"}, None) is None


@pytest.mark.parametrize("node", ["n[1-9]", "n1,n2", "n1 state=down", "-n1", "", "a" * 65, "n1\n"])
def test_a_node_name_that_is_not_one_name_falls_back_to_the_host(node: str) -> None:
    """`scontrol update nodename=` takes host lists: one plain name or none."""
    assert batch_job({"SLURM_JOB_ID": "7", "SLURMD_NODENAME": node}, None) == BatchJob("7", None, None)


def test_a_node_level_fault_on_its_gpu_makes_the_job_leave() -> None:
    bad = gpu(GPU0, 0, GpuState.EXCLUDED, action=Action.REBOOT_NODE, reason=XID79)
    facts = two_gpus() | {GPU0: bad}
    leave = must_leave([bad], facts, 1)
    assert leave is not None and leave.node_fault
    assert leave.reason == f"GPU 0: {XID79}"


def test_a_gpu_level_fault_with_enough_healthy_gpus_keeps_the_job() -> None:
    facts = faulted(two_gpus(), GPU0, Action.RESET_GPU)
    assert must_leave([facts[GPU0]], facts, 1) is None


def test_a_node_level_fault_on_another_gpu_is_not_the_jobs() -> None:
    facts = faulted(two_gpus(), GPU1, Action.REBOOT_NODE)
    assert must_leave([facts[GPU0]], facts, 1) is None


@pytest.mark.parametrize("other", [GpuState.EXCLUDED, GpuState.FAULTED, GpuState.RESETTING, GpuState.UNKNOWN, GpuState.DEGRADED])
def test_too_few_healthy_gpus_make_the_job_leave(other: GpuState) -> None:
    """Healthy is what placement takes: any other state of the last GPU leaves none."""
    facts = faulted(two_gpus(), GPU0, Action.RESET_GPU) | {GPU1: gpu(GPU1, 1, other)}
    assert must_leave([facts[GPU0]], facts, 1) == Leave("0 of 2 GPUs healthy, the job needs 1", False)


def test_what_the_job_needs_counts() -> None:
    """A job of two GPUs with one left leaves; with min_gpus 1 (its caller's `needs`) it stays."""
    facts = faulted(two_gpus(), GPU0, Action.RESET_GPU)
    assert must_leave([facts[GPU0]], facts, 2) == Leave("1 of 2 GPUs healthy, the job needs 2", False)
    assert must_leave([facts[GPU0]], facts, 1) is None


def test_the_reason_is_one_short_line() -> None:
    assert one_line("Xid 79\n  fallen\toff the bus\r\n") == "Xid 79 fallen off the bus"
    long = one_line("x" * 1000)
    assert len(long) == REASON_MAX and long.endswith("...")


# --- the supervisor on fakes -------------------------------------------------


class FakeScheduler:
    """The Scheduler port: records every call; `gate` (when set) holds each call until it opens."""

    def __init__(self) -> None:
        self.requeue_enabled = True
        self.store_wait_s = 5.0
        self.drain_set = True
        self.requeue_code = 0
        self.calls: list[tuple[str, BatchJob, str]] = []
        self.gate: threading.Event | None = None

    def drain(self, job: BatchJob, reason: str) -> CommandResult | None:
        if not self.drain_set:
            return None
        return self._call("drain", job, reason, 0)

    def requeue(self, job: BatchJob, reason: str) -> CommandResult:
        return self._call("requeue", job, reason, self.requeue_code)

    def _call(self, what: str, job: BatchJob, reason: str, code: int) -> CommandResult:
        if self.gate is not None:
            self.gate.wait(10)
        self.calls.append((what, job, reason))
        tail = "" if code == 0 else "slurm_requeue error: Requested operation is presently disabled"
        return CommandResult(("scontrol", what, job.job_id), code, f"exited {code}", tail)


class FakeStorage(NoStorage):
    """The SnapshotStore port as a hand-off sees it: `configured`, and every wait answered
    `answer` (after `gate` opens, if set); the rest (uploads, fetches) as without a store."""

    def __init__(self) -> None:
        self.configured = True
        self.answer = True  # what every wait_stored returns
        self.fetch_timeout_s = 5.0  # a first start looks in the store (and finds nothing)
        self.waits: list[tuple[str, str, float]] = []
        self.gate: threading.Event | None = None

    def wait_stored(self, job: str, snapshot_id: str, timeout_s: float) -> bool:
        self.waits.append((job, snapshot_id, timeout_s))
        if self.gate is not None:
            self.gate.wait(10)
        return self.answer


@dataclass
class SlurmNode(Node):
    """The fake node with a batch scheduler and shared storage behind the ports."""

    scheduler: FakeScheduler = field(default_factory=FakeScheduler)
    storage: FakeStorage = field(default_factory=FakeStorage)

    def ports(self) -> Ports:
        return replace(super().ports(), scheduler=self.scheduler, storage=self.storage)

    def release(self) -> None:
        for gate in (self.scheduler.gate, self.storage.gate):
            if gate is not None:
                gate.set()

    def trainer(self, sup: Supervisor, name: str = "j", env: dict[str, str] | None = None, **req: Any) -> Job:
        """A checkpointing trainer in a Slurm job (unless `env` says otherwise), its handler ready."""
        job = self.submit(sup, name, TRAINER, env=SLURM_ENV if env is None else env, checkpoint="ckpt.pt", **req)
        self.tick_until(sup, lambda: job.state == S.RUNNING, "the job to start")  # after the store was asked
        ready = sup.files.heartbeat(name).with_name("heartbeat.ready")
        wait_for(ready.exists, "the job's signal handler")
        return job


@pytest.fixture
def node(tmp_path: Path, watched: Callable[[SlurmNode], SlurmNode]) -> SlurmNode:
    return watched(SlurmNode(tmp_path))


def xid79(facts: Facts) -> dict[str, GpuFacts]:
    """GPU 0 faulted by Xid 79: a node-level (reboot-class) fault."""
    bad = faulted(facts, GPU0, Action.REBOOT_NODE)
    return bad | {GPU0: replace(bad[GPU0], reason=XID79)}


@pytest.mark.e2e  # real job processes, through fakes.Node
def test_a_node_level_fault_checkpoints_drains_and_requeues(node: SlurmNode, moves: MoveLog) -> None:
    """Xid 79 under a Slurm job: checkpoint, snapshot stored, drain n1, requeue 123, requeued."""
    sup = node.supervisor()
    job = node.trainer(sup)
    node.facts = xid79(node.facts)
    node.tick_until(sup, lambda: job.state == S.REQUEUED, "the job to be requeued")
    snapshot = sup.ring.newest("j")
    assert snapshot is not None
    assert node.storage.waits == [("j", snapshot.id, 5.0)]
    drain, requeue = node.scheduler.calls
    assert drain[0] == "drain" and requeue[0] == "requeue"
    assert drain[1] == requeue[1] == BatchJob("123", "n1", None)
    assert drain[2] == f"gpuguard: GPU 0: {XID79}"
    kinds = node.log.kinds("j")
    order = [EventKind.CHECKPOINT_REQUESTED, EventKind.JOB_HANDOFF, EventKind.NODE_DRAINED, EventKind.JOB_REQUEUED]
    assert [k for k in kinds if k in order] == order
    assert EventKind.JOB_RESTARTED not in kinds
    (requeued,) = node.log.of(EventKind.JOB_REQUEUED)
    assert requeued.data["slurm_job_id"] == "123" and requeued.data["stored"] is True
    assert (S.STOPPING, E.HAND_OFF, S.REQUEUEING) in moves.moves
    assert (S.REQUEUEING, E.REQUEUED, S.REQUEUED) in moves.moves
    assert node.records.saved["j"]["state"] == "requeued"
    (view,) = sup.view()
    assert view["state"] == "requeued" and view["gpus"] == [] and "job 123" in view["reason"]
    assert job.attempt.number == 1  # never started again here


@pytest.mark.e2e  # real job processes, through fakes.Node
def test_a_requeued_job_may_run_again_here_and_keeps_its_snapshots(node: SlurmNode) -> None:
    """Slurm may place it on this node again: `run` of the same name is accepted and resumes."""
    sup = node.supervisor()
    job = node.trainer(sup)
    node.facts = xid79(node.facts)
    node.tick_until(sup, lambda: job.state == S.REQUEUED, "the job to be requeued")
    snapshot = sup.ring.newest("j")
    assert snapshot is not None
    node.facts = two_gpus()
    again = node.trainer(sup)
    assert again is not job and again.state == S.RUNNING
    assert [s.id for s in sup.ring.list("j")] == [snapshot.id]
    (started,) = [e for e in node.log.of(EventKind.JOB_STARTED) if "resuming from" in e.message]
    assert snapshot.id in started.message


@pytest.mark.e2e  # real job processes, through fakes.Node
def test_too_few_healthy_gpus_hand_the_job_back(node: SlurmNode) -> None:
    """GPU 1 already excluded, a reset-class fault on GPU 0: no GPU left for it here."""
    sup = node.supervisor()
    job = node.trainer(sup)
    node.facts = faulted(node.facts, GPU0, Action.RESET_GPU) | {GPU1: gpu(GPU1, 1, GpuState.EXCLUDED)}
    node.tick_until(sup, lambda: job.state == S.REQUEUED, "the job to be requeued")
    assert [c[0] for c in node.scheduler.calls] == ["drain", "requeue"]
    assert node.scheduler.calls[0][2] == "gpuguard: 0 of 2 GPUs healthy, the job needs 1"
    (handoff,) = node.log.of(EventKind.JOB_HANDOFF)
    assert handoff.data["node_fault"] is False
    # the reset still follows once the job is off the GPU
    assert [c[0] for c in node.pool.called("reset_when_free")] == [GPU0]


@pytest.mark.e2e  # real job processes, through fakes.Node
def test_a_gpu_fault_with_a_healthy_gpu_left_moves_the_job_as_without_slurm(node: SlurmNode) -> None:
    sup = node.supervisor()
    job = node.trainer(sup)
    node.facts = faulted(node.facts, GPU0, Action.RESET_GPU)
    node.tick_until(sup, lambda: job.state == S.RUNNING and job.attempt.number == 2, "the restart on GPU 1")
    assert job.attempt.gpus == [GPU1]
    assert node.scheduler.calls == [] and node.storage.waits == []


@pytest.mark.e2e  # real job processes, through fakes.Node
@pytest.mark.parametrize("case", ["no SLURM_JOB_ID", "requeue not configured"])
def test_without_slurm_a_node_level_fault_moves_the_job_as_today(node: SlurmNode, case: str) -> None:
    sup = node.supervisor()
    if case == "requeue not configured":
        node.scheduler.requeue_enabled = False
    job = node.trainer(sup, env={"PATH": os.defpath} if case == "no SLURM_JOB_ID" else None)
    node.facts = xid79(node.facts)
    node.tick_until(sup, lambda: job.state == S.RUNNING and job.attempt.number == 2, "the restart on GPU 1")
    assert job.attempt.gpus == [GPU1]
    assert node.scheduler.calls == []
    assert EventKind.JOB_HANDOFF not in node.log.kinds("j")


@pytest.mark.e2e  # real job processes, through fakes.Node
def test_a_failed_requeue_leaves_the_job_waiting_here(node: SlurmNode, moves: MoveLog) -> None:
    sup = node.supervisor()
    node.scheduler.requeue_code = 1
    job = node.trainer(sup)
    node.facts = faulted(node.facts, GPU0, Action.RESET_GPU) | {GPU1: gpu(GPU1, 1, GpuState.EXCLUDED)}
    node.tick_until(sup, lambda: job.state == S.WAITING, "the job to wait here")
    (failed,) = node.log.of(EventKind.SLURM_REQUEUE_FAILED)
    assert failed.data["exit_code"] == 1 and "presently disabled" in failed.message
    assert "stays on this node" in failed.message
    assert EventKind.JOB_REQUEUED not in node.log.kinds("j")
    assert (S.REQUEUEING, E.HANDOFF_FAILED, S.STOPPING) in moves.moves
    assert EventKind.JOB_WAITING in node.log.kinds("j")
    # a healthy GPU again: it starts here from its snapshot
    node.facts = two_gpus()
    node.tick_until(sup, lambda: job.state == S.RUNNING, "the restart here")


@pytest.mark.e2e  # real job processes, through fakes.Node
def test_a_failed_requeue_with_a_healthy_gpu_left_moves_the_job(node: SlurmNode) -> None:
    """Xid 79 and a requeue that fails: as without Slurm, the job goes on on GPU 1."""
    sup = node.supervisor()
    node.scheduler.requeue_code = 1
    job = node.trainer(sup)
    node.facts = xid79(node.facts)
    node.tick_until(sup, lambda: job.state == S.RUNNING and job.attempt.number == 2, "the restart on GPU 1")
    assert job.attempt.gpus == [GPU1]
    assert [c[0] for c in node.scheduler.calls] == ["drain", "requeue"]


@pytest.mark.e2e  # real job processes, through fakes.Node
def test_a_snapshot_not_stored_in_time_is_said_and_the_job_requeued_anyway(node: SlurmNode) -> None:
    sup = node.supervisor()
    node.storage.answer = False
    job = node.trainer(sup)
    node.facts = xid79(node.facts)
    node.tick_until(sup, lambda: job.state == S.REQUEUED, "the job to be requeued")
    (late,) = node.log.of(EventKind.HANDOFF_UNSTORED)
    assert late.data["waited_s"] == 5.0 and "older stored snapshot" in late.message
    (requeued,) = node.log.of(EventKind.JOB_REQUEUED)
    assert requeued.data["stored"] is False and "still uploading" in requeued.message


@pytest.mark.e2e  # real job processes, through fakes.Node
def test_without_a_drain_command_only_the_requeue_runs(node: SlurmNode) -> None:
    sup = node.supervisor()
    node.scheduler.drain_set = False
    job = node.trainer(sup)
    node.facts = xid79(node.facts)
    node.tick_until(sup, lambda: job.state == S.REQUEUED, "the job to be requeued")
    assert [c[0] for c in node.scheduler.calls] == ["requeue"]
    assert EventKind.NODE_DRAINED not in node.log.kinds()


@pytest.mark.e2e  # real job processes, through fakes.Node
def test_the_tick_never_waits_for_the_hand_off(node: SlurmNode) -> None:
    """The storage wait and the commands run on a worker: ticks go on meanwhile."""
    sup = node.supervisor()
    node.storage.gate = threading.Event()
    job = node.trainer(sup)
    node.facts = xid79(node.facts)
    node.tick_until(sup, lambda: job.state == S.REQUEUEING and node.storage.waits, "the wait for the snapshot")
    for _ in range(3):
        sup.tick(0.0, node.facts)
    assert job.state == S.REQUEUEING and node.scheduler.calls == []
    (view,) = sup.view()
    assert view["state"] == "requeueing" and view["gpus"] == []
    with pytest.raises(JobError, match="being handed back to Slurm"):  # it could run twice
        sup.rollback("j", None, "ann")
    node.storage.gate.set()
    node.tick_until(sup, lambda: job.state == S.REQUEUED, "the job to be requeued")


@pytest.mark.e2e  # real job processes, through fakes.Node
def test_an_operator_stop_during_the_hand_off_runs_no_command(node: SlurmNode) -> None:
    sup = node.supervisor()
    node.storage.gate = threading.Event()
    job = node.trainer(sup)
    node.facts = xid79(node.facts)
    node.tick_until(sup, lambda: job.state == S.REQUEUEING and node.storage.waits, "the wait for the snapshot")
    sup.stop("j", "ann")
    assert job.state == S.STOPPED
    node.storage.gate.set()
    wait_for(lambda: not [t for t in threading.enumerate() if t.name == "handoff-j"], "the hand-off worker to end")
    assert node.scheduler.calls == []
    assert job.state == S.STOPPED


@pytest.mark.e2e  # real job processes, through fakes.Node
def test_a_new_daemon_finds_a_job_requeueing_and_hands_it_back(node: SlurmNode) -> None:
    """The daemon died during the hand-off (its worker never got to the requeue): the next one does it."""
    first = node.supervisor()
    node.storage.gate = threading.Event()
    job = node.trainer(first)
    node.facts = xid79(node.facts)
    node.tick_until(first, lambda: job.state == S.REQUEUEING and node.storage.waits, "the wait for the snapshot")
    assert node.records.saved["j"]["state"] == "requeueing"
    first.runner.handoff._runs.clear()  # the old daemon is gone: its worker's outcome goes nowhere
    node.storage.gate.set()
    second = node.supervisor()
    again = second.jobs["j"]
    node.tick_until(second, lambda: again.state == S.REQUEUED, "the job to be requeued by the new daemon")
    assert [c[0] for c in node.scheduler.calls] == ["drain", "requeue"]
    assert again.attempt.number == 1


@pytest.mark.e2e  # real job processes, through fakes.Node
def test_a_new_daemon_without_requeue_keeps_a_requeueing_job_here(node: SlurmNode) -> None:
    """[slurm] requeue emptied while no daemon ran: the job goes on here, as after any fault."""
    first = node.supervisor()
    node.storage.gate = threading.Event()
    job = node.trainer(first)
    node.facts = xid79(node.facts)
    node.tick_until(first, lambda: job.state == S.REQUEUEING and node.storage.waits, "the wait for the snapshot")
    first.runner.handoff._runs.clear()  # the old daemon is gone
    node.scheduler.requeue_enabled = False
    second = node.supervisor()
    again = second.jobs["j"]
    node.tick_until(second, lambda: again.state == S.RUNNING, "the restart here")
    assert again.attempt.gpus == [GPU1] and again.attempt.number == 2
    assert node.scheduler.calls == []
