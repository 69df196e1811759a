"""Handing a job back to the batch scheduler, once `handoff.must_leave` says it
cannot go on on this node.

The stop worker has already checkpointed and stopped the job. `begin` runs in
the tick (from `finish_stop`, under the supervisor's lock): the job moves to
`requeueing` and a worker thread (`handoff-<job>`) takes the slow steps: it
waits for the newest snapshot to be stored (`ports.storage`, bounded by
`[slurm] store_wait_s`), drains the node, then requeues the job
(`ports.scheduler`), recording an event for each. The next tick (`tick`)
moves the job to `requeued`, or, when the requeue failed, restarts it here as
after any fault stop. The worker takes the supervisor's lock only briefly, to
see whether the job is still to be handed back (an operator may stop it
meanwhile), and never the daemon's. A daemon restarted during a hand-off
finds the job `requeueing` and runs the steps again.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from gpuguard.events import Event, EventKind
from gpuguard.health.types import Severity
from gpuguard.supervisor.handoff import batch_job, must_leave
from gpuguard.supervisor.job import Job
from gpuguard.supervisor.ports import BatchJob, CommandResult
from gpuguard.supervisor.states import JobEvent, JobState

if TYPE_CHECKING:
    from gpuguard.supervisor.runner import JobRunner

log = structlog.get_logger("gpuguard.supervisor")


@dataclass
class _Run:
    """One hand-off under way; `requeued` is set by its worker (under the supervisor's lock)."""

    batch: BatchJob
    reason: str
    snapshot: str | None  # the newest snapshot's id when the hand-off began
    ended: str  # how the stop ended, for the restart here if the requeue fails
    stored: bool | None = None  # the snapshot reached [storage] in time (None: none to wait for)
    requeued: bool | None = None  # None while the worker runs


class HandOff:
    def __init__(self, runner: JobRunner) -> None:
        self.runner = runner
        self._runs: dict[str, _Run] = {}  # by job name; guarded by the supervisor's lock

    def begin(self, job: Job, ended: str) -> bool:
        """After a fault stop: hand the job back when it runs inside a scheduler's
        allocation, a requeue command is set and this node cannot run it. False:
        nothing to do, it restarts here as usual."""
        runner = self.runner
        if not runner.ports.scheduler.requeue_enabled:
            return False
        batch = _batch(job)
        if batch is None:
            return False
        needs = job.spec.min_gpus or job.spec.gpus_wanted
        leave = must_leave([runner.fact(uuid) for uuid in job.attempt.gpus], runner.facts, needs)
        if leave is None:
            return False
        job.attempt.reason = leave.reason
        job.attempt.gpus = []  # it leaves them: another job may take them, status shows it on none
        runner.move(
            job, JobEvent.HAND_OFF, EventKind.JOB_HANDOFF, Severity.WARNING,
            f"job {job.name} stopped ({ended}) and cannot go on on this node: {leave.reason}; "
            f"handing it back to Slurm (job {batch.job_id})",
            data={"slurm_job_id": batch.job_id, "node_fault": leave.node_fault},
        )
        self._start(job, batch, ended)
        return True

    def tick(self, job: Job) -> None:
        """A job in `requeueing`: pick up its worker's outcome, or start the steps
        again when no worker runs (a daemon restart came in between)."""
        run = self._runs.get(job.name)
        if run is None:
            batch = _batch(job) if self.runner.ports.scheduler.requeue_enabled else None
            if batch is not None:
                self._start(job, batch, "before a daemon restart")
            else:  # [slurm] requeue was turned off by a reload meanwhile
                self._stay(job, "before a daemon restart")
            return
        if run.requeued is None:
            return  # still at work
        del self._runs[job.name]
        if not run.requeued:
            self._stay(job, run.ended)
            return
        job.attempt.reason = f"requeued in Slurm (job {run.batch.job_id}): {run.reason}"
        self.runner.move(
            job, JobEvent.REQUEUED, EventKind.JOB_REQUEUED, Severity.INFO,
            f"job {job.name} handed back to Slurm: job {run.batch.job_id} requeued; it ends on this node "
            f"and the scheduler starts it on another, {self._resumes(run)}",
            data={"slurm_job_id": run.batch.job_id, "snapshot": run.snapshot, "stored": run.stored},
        )

    def _stay(self, job: Job, ended: str) -> None:
        """No hand-off after all: on as after any fault stop (restart here, or wait for GPUs)."""
        self.runner.move(job, JobEvent.HANDOFF_FAILED)
        self.runner.fault_restart(job, ended)

    def _resumes(self, run: _Run) -> str:
        if not self.runner.ports.storage.configured:
            return "without this node's snapshots (no [storage] url)"
        if run.snapshot is None:
            return "from scratch (the job saved no snapshot)"
        if run.stored:
            return f"from snapshot {run.snapshot} in [storage]"
        return f"from the newest snapshot stored by then ({run.snapshot} was still uploading)"

    def _start(self, job: Job, batch: BatchJob, ended: str) -> None:
        newest = self.runner.intake.ring.newest(job.name)  # a stat per snapshot, no read
        run = _Run(batch, job.attempt.reason or "cannot go on on this node", newest.id if newest else None, ended)
        self._runs[job.name] = run
        threading.Thread(target=self._work, args=(job.name, run), name=f"handoff-{job.name}", daemon=True).start()

    # --- the worker ----------------------------------------------------
    def _work(self, name: str, run: _Run) -> None:
        try:
            requeued = self._steps(name, run)
        except Exception:  # a broken port must not leave the job requeueing for ever
            log.exception("handoff_failed", job=name)
            requeued = False
        with self.runner.lock:
            if self._runs.get(name) is not run:
                return  # a newer hand-off of a job of this name took over
            if requeued is None:
                del self._runs[name]  # stopped by an operator meanwhile
                return
            run.requeued = requeued
        self.runner.ports.wake()

    def _steps(self, name: str, run: _Run) -> bool | None:
        """Wait for the snapshot, drain, requeue: True when requeued, None when the
        job is no longer to be handed back (then nothing more is run)."""
        ports = self.runner.ports
        scheduler = ports.scheduler
        if run.snapshot is not None:
            wait_s = scheduler.store_wait_s
            run.stored = ports.storage.wait_stored(name, run.snapshot, wait_s)
            if not run.stored:
                self._say(
                    name, EventKind.HANDOFF_UNSTORED, Severity.WARNING,
                    f"job {name}: snapshot {run.snapshot} not in [storage] after {wait_s:g}s; requeueing anyway "
                    "(the next node resumes from an older stored snapshot unless the upload finishes first)",
                    {"snapshot": run.snapshot, "waited_s": wait_s},
                )
        if not self._wanted(name, run):
            return None
        reason = f"gpuguard: {run.reason}"
        drained = scheduler.drain(run.batch, reason)
        if drained is not None:
            self._command(name, run, "drain", drained, EventKind.NODE_DRAINED, EventKind.SLURM_DRAIN_FAILED)
        if not self._wanted(name, run):
            return None
        requeued = scheduler.requeue(run.batch, reason)
        self._command(name, run, "requeue", requeued, None, EventKind.SLURM_REQUEUE_FAILED)
        return requeued.ok

    def _wanted(self, name: str, run: _Run) -> bool:
        with self.runner.lock:
            job = self.runner.jobs.get(name)
            return job is not None and job.state == JobState.REQUEUEING and self._runs.get(name) is run

    def _command(self, name: str, run: _Run, what: str, result: CommandResult, ok_kind: str | None, failed_kind: str) -> None:
        data = {
            "slurm_job_id": run.batch.job_id,
            "argv": list(result.argv),
            "exit_code": result.exit_code,
            "timed_out": result.timed_out,
            "output_tail": result.output_tail,
        }
        tail = f": {result.output_tail}" if result.output_tail else ""
        if not result.ok:
            after = "requeueing anyway" if what == "drain" else "the job stays on this node"
            self._say(name, failed_kind, Severity.ERROR, f"job {name}: Slurm {what} {result.outcome}{tail}; {after}", data)
        elif ok_kind is not None:
            self._say(name, ok_kind, Severity.WARNING, f"this node drained in Slurm for job {name}: {run.reason}", data)

    def _say(self, name: str, kind: str, severity: Severity, message: str, data: dict[str, Any]) -> None:
        self.runner.ports.record(Event(kind=kind, severity=severity, message=message, job=name, data=data))


def _batch(job: Job) -> BatchJob | None:
    user = job.spec.user
    return batch_job(job.spec.env, (user.uid, user.gid, tuple(user.groups)) if user is not None else None)
