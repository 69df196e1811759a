"""What follows the end of an attempt that nobody stopped: success, a restart
request (exit 75 unasked), a crash with its back-off and budget; and what the
attempt left behind. Part of the JobRunner (the one owner of state changes)."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from gpuguard import contract
from gpuguard.events import EventKind
from gpuguard.health.types import Severity
from gpuguard.supervisor.job import Job
from gpuguard.supervisor.jobprocess import kill_cgroup_of
from gpuguard.supervisor.policy import backoff_s
from gpuguard.supervisor.states import JobEvent

if TYPE_CHECKING:
    from gpuguard.supervisor.runner import JobRunner

TAIL_BYTES = 4096
LEFTOVER_TERM_S = 2.0  # SIGTERM to SIGKILL for what an ended attempt left behind (it runs in the tick)
# the restart budgets, each counted and spent apart (status shows them as restarts_by_kind)
CRASH, FAULT, REQUEST = "crash", "fault", "request"
RESTART_KINDS = (CRASH, FAULT, REQUEST)


class ExitHandling:
    def _end_leftovers(self: JobRunner, job: Job) -> None:
        """Processes the ended attempt left behind must not run beside the next one (nor
        share its cgroup): stopped before anything else happens, bounded by stop_timeout_s."""
        if job.rt.proc is not None:
            left = job.rt.proc.end_leftovers(min(self.settings.stop_timeout_s, LEFTOVER_TERM_S))
        else:
            left = kill_cgroup_of(job.name, self.files.status(job.name, job.attempt.slot))
        if left:
            self.say(
                job, EventKind.JOB_LEFTOVERS_STOPPED, Severity.WARNING,
                f"job {job.name}: its main process ended but left {len(left)} process(es) behind "
                f"(pids {', '.join(map(str, left[:10]))}); they were stopped",
            )

    def on_exit(self: JobRunner, job: Job, code: int | None, note: str | None) -> None:
        job.attempt.exit_code = code
        ran_s = time.time() - (job.attempt.started_at or time.time())
        self._end_leftovers(job)
        self._vacate(job)
        self.intake.ingest(job)
        where = f" ({note})" if note else ""
        if code == 0:
            job.attempt.reason = None
            self.move(job, JobEvent.EXITED_OK, EventKind.JOB_SUCCEEDED, Severity.INFO, f"job {job.name} succeeded after {job.attempt.number} attempt(s){where}")
        elif code == contract.EX_TEMPFAIL and note is not None:
            # it ended while no daemon watched: perhaps on a checkpoint signal the
            # previous daemon sent; a saved checkpoint is honoured at once
            job.attempt.restarts += 1
            self.move(job, JobEvent.EXITED_RESTART, EventKind.JOB_STOPPING_DONE, Severity.INFO, f"job {job.name} saved a checkpoint and asked for a restart (exit 75){where}")
            self.try_start(job, time.time())
            self.persist(job)
        elif code == contract.EX_TEMPFAIL:
            self._restart_requested(job, ran_s)
        else:
            self._crashed(job, code, ran_s, where)

    def _restart_requested(self: JobRunner, job: Job, ran_s: float) -> None:
        """Exit 75 nobody asked for: a restart request, with back-off, counted toward
        max_restarts (CONTRACT.md), so a job that keeps asking cannot loop forever."""
        settings, a = self.settings, job.attempt
        if ran_s >= settings.stable_after_s:
            a.requests = 0
        a.requests += 1
        used = a.restarts_by.get(REQUEST, 0)
        if used >= job.spec.max_restarts:
            a.reason = f"exit 75 unasked (a restart request); gave up after {used} such restart(s) (max_restarts {job.spec.max_restarts})"
            self.move(job, JobEvent.GAVE_UP, EventKind.JOB_FAILED, Severity.ERROR, f"job {job.name} failed: {a.reason}")
            return
        delay = backoff_s(a.requests, settings.backoff_initial_s, settings.backoff_max_s)
        a.backoff_until = time.time() + delay
        self._count(job, REQUEST)
        a.reason = f"exit 75 unasked (a restart request); restart {a.restarts_by[REQUEST]} of {job.spec.max_restarts} in {delay:g}s"
        self.move(job, JobEvent.RESTART_REQUESTED, EventKind.JOB_RESTART_REQUESTED, Severity.INFO, f"job {job.name}: {a.reason}")

    def _crashed(self: JobRunner, job: Job, code: int | None, ran_s: float, where: str) -> None:
        settings = self.settings
        if ran_s >= settings.stable_after_s:
            job.attempt.crashes = 0
        job.attempt.crashes += 1
        what = "exit status unknown" if code is None else (f"killed by signal {-code}" if code < 0 else f"exit {code}")
        tail = self._tail(job)
        used = job.attempt.restarts_by.get(CRASH, 0)
        if used >= job.spec.max_restarts:
            job.attempt.reason = f"{what}; gave up after {used} crash restart(s) (max_restarts {job.spec.max_restarts})"
            self.move(job, JobEvent.GAVE_UP, EventKind.JOB_FAILED, Severity.ERROR, f"job {job.name} failed: {job.attempt.reason}{where}", data={"output_tail": tail})
            return
        delay = backoff_s(job.attempt.crashes, settings.backoff_initial_s, settings.backoff_max_s)
        job.attempt.backoff_until = time.time() + delay
        self._count(job, CRASH)
        job.attempt.reason = f"{what}; restart {job.attempt.restarts_by[CRASH]} of {job.spec.max_restarts} in {delay:g}s"
        self.move(
            job, JobEvent.CRASHED, EventKind.JOB_CRASHED, Severity.WARNING, f"job {job.name} crashed: {job.attempt.reason}{where}",
            data={"output_tail": tail, "backoff_s": delay},
        )

    def _tail(self: JobRunner, job: Job) -> str:
        try:
            with open(self.files.log(job.name), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - TAIL_BYTES))
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-10:])

    @staticmethod
    def _count(job: Job, kind: str) -> None:
        job.attempt.restarts += 1
        job.attempt.restarts_by[kind] = job.attempt.restarts_by.get(kind, 0) + 1
