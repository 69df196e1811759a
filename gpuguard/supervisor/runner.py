"""The one owner of job state changes.

Every move of a job goes through `move`: the states.py table says whether it
is legal, the record is saved, and the event is written, together. Starting
an attempt, carrying out a fault decision, the stop sequence and what follows
an exit live here; the Supervisor facade only routes requests and ticks.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import structlog

from gpuguard.events import Event, EventKind
from gpuguard.fault import FaultNote
from gpuguard.health.types import Action, GpuState, Severity
from gpuguard.supervisor.files import JobFiles, job_env, remove, write_for_job
from gpuguard.supervisor.hang import Clock
from gpuguard.supervisor.intake import CheckpointIntake
from gpuguard.supervisor.job import Job
from gpuguard.supervisor.placement import free_gpus, pick_gpus
from gpuguard.supervisor.policy import Decision, Reaction, app_xid_key, backoff_s
from gpuguard.supervisor.ports import Facts, GpuFacts, Ports, Settings
from gpuguard.supervisor.exits import FAULT, ExitHandling
from gpuguard.supervisor.process import StopResult, UserSpec, spawn
from gpuguard.supervisor.remote import StoredFetch
from gpuguard.supervisor.requeue import HandOff
from gpuguard.supervisor.standby import Standbys
from gpuguard.supervisor.states import ACTIVE, FINAL, JobEvent, JobState, transition

log = structlog.get_logger("gpuguard.supervisor")

RELEASE_WAIT_S = 30.0  # how long a restart waits for NVML to stop listing the old attempt on its GPUs
_WHAT = {
    Reaction.RESTART_SAME: "restart on the same GPU",
    Reaction.MOVE: "move to a healthy GPU",
    Reaction.MIGRATE: "migrate off a degraded GPU",
}


class JobRunner(ExitHandling):
    def __init__(self, ports: Ports, jobs: dict[str, Job], lock: threading.RLock, files: JobFiles, intake: CheckpointIntake) -> None:
        self.ports = ports
        self.jobs = jobs
        self.lock = lock
        self.files = files
        self.intake = intake
        self.facts: Facts = {}  # the latest facts: of this tick, or fetched for a request
        self.handoff = HandOff(self)  # jobs this node cannot run go back to the batch scheduler
        self.standby = Standbys(self)  # each job's next attempt, started early (standby.py)
        # a job's first start may wait (on a worker) for a newer snapshot from [storage] url
        self.fetch = StoredFetch(intake.ring, ports.storage, files.jobs_dir.parent / "fetch", self.say, ports.wake)

    @property
    def settings(self) -> Settings:
        return self.ports.settings()

    # --- the one way a job changes state --------------------------------
    def move(
        self,
        job: Job,
        event: JobEvent,
        kind: str | None = None,
        severity: Severity = Severity.INFO,
        message: str = "",
        **extra: Any,
    ) -> None:
        """Transition through the table, write the event (when one is given), save the record."""
        job.attempt.state = transition(job.attempt.state, event)
        if job.attempt.state in FINAL:
            job.attempt.gpus = []  # a job in a final state holds no GPU
        if job.attempt.state in FINAL or job.attempt.state == JobState.REQUEUEING:
            self.standby.end(job)  # no next attempt here
        if kind is not None:
            self.say(job, kind, severity, message, **extra)
        self.persist(job)

    def persist(self, job: Job) -> bool:
        try:
            self.ports.records.put_job(job.name, job.record())
        except Exception as exc:  # the job goes on; the next change tries again
            log.error("job_persist_failed", job=job.name, error=str(exc))
            return False
        return True

    def say(self, job: Job, kind: str, severity: Severity, message: str, *, gpu: str | None = None, data: dict[str, Any] | None = None) -> None:
        self.ports.record(Event(kind=kind, severity=severity, message=message, job=job.name, gpu=gpu, data=data or {}))

    def fact(self, uuid: str) -> GpuFacts:
        found = self.facts.get(uuid)
        return found if found is not None else GpuFacts(uuid, GpuState.UNKNOWN, Action.NONE, "not a GPU of this node")

    def index(self, uuid: str) -> int | str:
        found = self.facts.get(uuid)
        return found.index if found is not None else uuid

    # --- starting -------------------------------------------------------
    def try_start(self, job: Job, now: float) -> None:
        """Start the next attempt on free healthy GPUs, or wait for some."""
        if not self.fetch.ready(job):
            return  # a stored snapshot is being fetched; its worker wakes the loop
        taken = {
            uuid
            for j in self.jobs.values()
            if j is not job and (j.rt.proc is not None or j.state in ACTIVE)
            for uuid in j.attempt.gpus
        }
        suspects = {uuid for uuid, fact in self.facts.items() if fact.suspect}
        gpus = pick_gpus(free_gpus(self.facts, taken), job.attempt.gpus, job.spec.gpus_wanted, job.spec.min_gpus, suspects)
        if gpus is None:
            if job.state == JobState.STARTING:
                job.attempt.state = transition(job.state, JobEvent.NO_GPUS)
            if not job.rt.waiting_reported:
                job.rt.waiting_reported = True
                job.attempt.gpus = []
                needs = job.spec.min_gpus or job.spec.gpus_wanted
                self.say(job, EventKind.JOB_WAITING, Severity.WARNING, f"job {job.name} is waiting: it needs {needs} healthy GPU(s) and none can take it now")
                self.persist(job)
            return
        if job.state == JobState.WAITING:
            job.attempt.state = transition(job.state, JobEvent.GPUS_FREE)
        job.rt.waiting_reported = False
        # the GPUs are the job's from here (a starting job holds them), also while it waits to
        # start on them: its previous ones may meanwhile belong to another job
        job.attempt.gpus = gpus
        if not self._released(job, gpus, now):
            return  # the next tick looks again
        job.attempt.number += 1
        if not self.persist(job):
            # an attempt the record does not know could run twice after a daemon restart:
            # none starts until its record is saved (a full disk); the next tick tries again
            job.attempt.number -= 1
            return
        resume = self.intake.resume_from(job)
        try:
            self.files.prepare(job)
            env = job_env(job, self.files, self.settings.checkpoint_signal, resume)
            # a waiting standby is told to start (its record is saved); else a new process
            proc = self.standby.promote(job, env) or spawn(
                list(job.spec.command), env=env, cwd=job.spec.workdir, user=job.spec.user,
                log_path=self.files.log(job.name), status_path=self.files.status(job.name, job.attempt.slot), job_name=job.name,
            )
        except (OSError, ValueError) as exc:
            job.attempt.reason = f"cannot start: {exc}"
            self.move(job, JobEvent.SPAWN_FAILED, EventKind.JOB_FAILED, Severity.ERROR, f"job {job.name} failed to start: {exc}")
            return
        job.rt.proc = proc
        job.attempt.pid, job.attempt.start_time = proc.pid, proc.start_time
        job.attempt.started_at = now
        job.rt.clock = Clock.start(now)
        # restart-the-app Xids already on these GPUs (the one that caused this restart, or one from
        # before the job came) stay in their window for a while: they are not this attempt's business
        job.rt.handled = {key for uuid in gpus if (key := app_xid_key(self.fact(uuid))) is not None}
        job.attempt.backoff_until = None
        self.occupy(job)
        where = ", ".join(f"GPU {self.index(u)}" for u in gpus)
        resumed = f", resuming from {resume}" if resume else ""
        if job.attempt.number == 1:
            self.move(job, JobEvent.SPAWNED, EventKind.JOB_STARTED, Severity.INFO, f"job {job.name} started on {where} (pid {proc.pid}){resumed}")
        else:
            self.move(
                job, JobEvent.SPAWNED, EventKind.JOB_RESTARTED, Severity.INFO,
                f"job {job.name} attempt {job.attempt.number} started on {where} (pid {proc.pid}){resumed}",
                data={"resume_from": resume, "attempt": job.attempt.number},
            )

    def _released(self, job: Job, gpus: list[str], now: float) -> bool:
        """Is every GPU free of the previous attempt's processes (NVML lists none of them)?
        A restart on the same GPU would otherwise meet its memory still held. The wait is
        bounded: past RELEASE_WAIT_S the attempt starts anyway, and an event says so."""
        held = sorted({(self.index(u), pid) for u in gpus for pid in self.fact(u).holders if pid in job.rt.old_pids}, key=str)
        if not held:
            job.rt.old_pids, job.rt.release_wait_since = frozenset(), None
            return True
        if job.rt.release_wait_since is None:
            job.rt.release_wait_since = now
            self.ports.pool.refresh()  # the facts may be from before the old attempt ended
        if now - job.rt.release_wait_since < RELEASE_WAIT_S:
            return False
        where = ", ".join(f"pid {pid} on GPU {index}" for index, pid in held)
        self.say(
            job, EventKind.GPU_NOT_RELEASED, Severity.WARNING,
            f"job {job.name}: NVML still lists the previous attempt ({where}) after {RELEASE_WAIT_S:g}s; starting anyway",
        )
        job.rt.old_pids, job.rt.release_wait_since = frozenset(), None
        return True

    def occupy(self, job: Job) -> None:
        if job.attempt.pid:
            for uuid in job.attempt.gpus:
                self.ports.pool.occupied(uuid, job.attempt.pid)

    def _vacate(self, job: Job) -> None:
        if job.attempt.pid:
            for uuid in job.attempt.gpus:
                self.ports.pool.vacated(uuid, job.attempt.pid)
        if job.rt.proc is not None:
            job.rt.old_pids = frozenset(job.rt.proc.ever)
        job.rt.proc = None
        job.attempt.pid = job.attempt.start_time = None

    # --- faults ---------------------------------------------------------
    def act(self, job: Job, decision: Decision) -> bool:
        """Carry out a decision; False when it cannot be done now (migrate with no free GPU)."""
        if decision.reaction == Reaction.MIGRATE:
            taken = {u for j in self.jobs.values() if j is not job and (j.rt.proc is not None or j.state in ACTIVE) for u in j.attempt.gpus}
            if len(free_gpus(self.facts, taken)) < len(job.attempt.gpus):
                return False
        job.rt.handled.add(decision.key)
        if decision.exclude:
            self.ports.pool.exclude(decision.gpu, decision.reason)
        if decision.node_hook:
            self.ports.pool.node_unhealthy(decision.reason)
        if decision.reset:
            job.attempt.pending_resets.append(decision.gpu)
        self.move(
            job, JobEvent.FAULT, EventKind.CHECKPOINT_REQUESTED, Severity.WARNING,
            f"job {job.name}: GPU {self.index(decision.gpu)} {decision.reason}: checkpoint, then {_WHAT[decision.reaction]}",
            gpu=decision.gpu,
        )
        self.begin_stop(job, "restart", decision.reason, checkpoint=True, gpu=decision.gpu, gpu_lost=decision.gpu_lost)
        return True

    # --- stopping -------------------------------------------------------
    def begin_stop(
        self, job: Job, after: str, reason: str, *, checkpoint: bool, grace_s: float | None = None,
        term_timeout_s: float | None = None, gpu: str | None = None, gpu_lost: bool = False,
    ) -> None:
        """Run the contract's stop sequence on a worker thread; the caller has moved the state.

        Before a checkpoint signal the job's fault note says why, and whether `gpu` is gone."""
        assert job.rt.proc is not None
        proc = job.rt.proc
        settings = self.settings
        job.attempt.after_stop = after
        job.attempt.reason = reason
        job.rt.stop_result = None
        sig = signal.Signals[settings.checkpoint_signal] if checkpoint else None
        if sig is not None and proc.job_catches(sig) is False:
            # its default action would kill the job before it could save anything
            self.say(
                job, EventKind.CHECKPOINT_UNSUPPORTED, Severity.WARNING,
                f"job {job.name} does not handle {sig.name}: stopped without a checkpoint (SIGTERM at once)",
            )
            sig = None
        grace = settings.checkpoint_grace_s if grace_s is None else grace_s
        term = settings.stop_timeout_s if term_timeout_s is None else term_timeout_s

        def on_phase(phase: str) -> None:
            if phase in ("term", "kill"):
                with self.lock:
                    if job.state == JobState.CHECKPOINTING:
                        self.move(job, JobEvent.TERMINATING)

        note = FaultNote(job.attempt.number, reason, gpu, gpu_lost) if sig is not None else None
        user = job.spec.user

        def run() -> None:
            if note is not None:
                self._write_note(job.name, note, user)
            result = proc.stop(sig, grace, term, on_phase)
            # the checkpoint it may just have written is copied here, off the tick and its
            # locks; finish_stop's own ingest then finds it in the ring (a stat)
            self.intake.ingest(job)
            with self.lock:
                job.rt.stop_result = result
            self.ports.wake()  # finish the stop at once, not at the next poll

        job.rt.stopping = threading.Thread(target=run, name=f"stop-{job.name}", daemon=True)
        job.rt.stopping.start()
        self.persist(job)

    def _write_note(self, name: str, note: FaultNote, user: UserSpec | None) -> None:
        """The fault note, off the tick; one that cannot be written (a full disk) only costs the
        job the hint: the checkpoint signal goes out all the same."""
        try:
            write_for_job(self.files.fault_note(name), note.encode(), user)
        except OSError as exc:
            log.warning("fault_note_not_written", job=name, error=str(exc))

    def finish_stop(self, job: Job) -> None:
        result = job.rt.stop_result or StopResult(None, None, (), ())
        code = result.returncode
        if result.survivors:
            self.say(job, EventKind.JOB_STOP_INCOMPLETE, Severity.ERROR, f"job {job.name}: processes survived SIGKILL: {', '.join(map(str, result.survivors))}")
        holders = self._gpu_holders(job, result)
        after = job.attempt.after_stop
        job.attempt.after_stop = None
        if job.state == JobState.CHECKPOINTING:  # it ended during the grace
            job.attempt.state = transition(job.state, JobEvent.TERMINATING)
        job.attempt.exit_code = code
        try:
            remove(self.files.fault_note(job.name))  # the next attempt must not read this one's
        except OSError as exc:  # the note's attempt number still tells it apart
            log.warning("fault_note_not_removed", job=job.name, error=str(exc))
        self._vacate(job)
        self.intake.ingest(job)
        for uuid in job.attempt.pending_resets:
            self.ports.pool.reset_when_free(uuid, by=f"gpuguard (job {job.name})")
        job.attempt.pending_resets = []
        if after == "stopped":
            self.move(job, JobEvent.STOPPED, EventKind.JOB_STOPPED, Severity.INFO, f"job {job.name} stopped ({_ended(result)}){holders}")
        elif after == "restart" and code == 0 and result.phase in ("checkpoint", "already_exited"):
            self.move(job, JobEvent.EXITED_OK, EventKind.JOB_SUCCEEDED, Severity.INFO, f"job {job.name} finished (exit 0) while being stopped{holders}")
        elif after == "rollback":
            job.attempt.crashes = 0
            job.attempt.restarts += 1  # the operator's: no budget
            self.move(job, JobEvent.EXITED_RESTART, EventKind.JOB_STOPPING_DONE, Severity.INFO, f"job {job.name} stopped for a restart ({_ended(result)}){holders}")
            self.try_start(job, time.time())
            self.persist(job)
        else:
            ended = f"{_ended(result)}{holders}"
            if not self.handoff.begin(job, ended):  # a job this node cannot run goes back to Slurm
                self.fault_restart(job, ended)

    def fault_restart(self, job: Job, ended: str) -> None:
        """After a stop for a fault or a hang: restart at once; repeated moves of a job that
        does not stay up back off, and the fault budget (max_restarts) ends a job that
        every GPU it is moved to brings down."""
        settings, a = self.settings, job.attempt
        if a.restarts_by.get(FAULT, 0) >= job.spec.max_restarts:
            a.reason = f"moved {a.restarts_by.get(FAULT, 0)} time(s) for GPU faults or hangs; gave up (max_restarts {job.spec.max_restarts})"
            self.move(job, JobEvent.GAVE_UP, EventKind.JOB_FAILED, Severity.ERROR, f"job {job.name} failed: {a.reason} ({ended})")
            return
        ran_s = time.time() - (a.started_at or time.time())
        if ran_s >= settings.stable_after_s:
            a.faults = 0
        a.faults += 1
        self._count(job, FAULT)
        delay = backoff_s(a.faults - 1, settings.backoff_initial_s, settings.backoff_max_s)  # the first move is at once
        if delay <= 0:
            self.move(job, JobEvent.EXITED_RESTART, EventKind.JOB_STOPPING_DONE, Severity.INFO, f"job {job.name} stopped for a restart ({ended})")
            self.try_start(job, time.time())
            self.persist(job)
            return
        a.backoff_until = time.time() + delay
        a.reason = f"fault restart {a.restarts_by[FAULT]} of {job.spec.max_restarts}, in {delay:g}s: it did not stay up {settings.stable_after_s:g}s after the last move"
        self.move(job, JobEvent.RESTART_DELAYED, EventKind.JOB_STOPPING_DONE, Severity.INFO, f"job {job.name} stopped for a restart ({ended}); {a.reason}")

    def _gpu_holders(self, job: Job, result: StopResult) -> str:
        """After a stop: does NVML still list one of the job's processes on its GPUs?"""
        if not result.survivors:
            return ""
        held = [f"pid {pid} on GPU {self.index(uuid)}" for uuid in job.attempt.gpus for pid in self.fact(uuid).holders if pid in result.survivors]
        return f"; still holding GPU memory: {', '.join(held)}" if held else ""



def _ended(result: StopResult) -> str:
    code = result.returncode
    how = {"checkpoint": "after the checkpoint signal", "term": "after SIGTERM", "kill": "by SIGKILL", "already_exited": "it had exited"}
    phase = how.get(result.phase or "", "end unknown")
    return f"exit {code}, {phase}" if code is not None else phase

