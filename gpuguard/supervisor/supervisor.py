"""The supervisor: managed jobs that survive GPU faults.

The daemon hands it ports (ports.py) and, once per tick, the facts about
every GPU; it reads them, asks `policy.decide` what each job should do and
has the `JobRunner` carry it out: checkpoint, stop the whole tree, ask the
GPU pool to exclude or reset a GPU, restart on healthy GPUs from the newest
valid snapshot. Slow steps (a stop with its grace) run on worker threads;
their results are picked up by the next tick. Every change of a job is saved,
so a restarted daemon finds its jobs again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import psutil
import structlog

from gpuguard.config import JobEntry
from gpuguard.events import EventKind
from gpuguard.health.types import Severity
from gpuguard.supervisor import exitcode, hang, jobspec, remote
from gpuguard.supervisor.files import SLOTS, JobFiles
from gpuguard.supervisor.holders import ForeignHolders
from gpuguard.supervisor.intake import CheckpointIntake
from gpuguard.supervisor.job import Job
from gpuguard.supervisor.jobspec import JobError
from gpuguard.supervisor.policy import decide
from gpuguard.supervisor.ports import Facts, Ports
from gpuguard.supervisor.jobprocess import kill_cgroup_of
from gpuguard.supervisor.pids import wrappers_of
from gpuguard.supervisor.process import StopResult, adopt, become_subreaper
from gpuguard.supervisor.exits import RESTART_KINDS
from gpuguard.supervisor.runner import JobRunner
from gpuguard.supervisor.snapshots import SnapshotCorrupt, SnapshotRing
from gpuguard.supervisor.states import ACTIVE, FINAL, JobEvent, JobState

log = structlog.get_logger("gpuguard.supervisor")

HANG_GRACE_S = 10.0  # a hung trainer gets this long (at most) to checkpoint
HANG_TERM_S = 2.0  # ... and this long (at most) after SIGTERM: a hung process rarely acts on it


class Supervisor:
    def __init__(self, ports: Ports, files: JobFiles, ring: SnapshotRing) -> None:
        self.ports = ports
        self.files = files
        self.ring = ring
        self.jobs: dict[str, Job] = {}
        self.lock = threading.RLock()
        self.intake = CheckpointIntake(ring, files, self.jobs.get, self._say, self._persist, ports.storage)
        self.runner = JobRunner(ports, self.jobs, self.lock, files, self.intake)
        self.foreign = ForeignHolders(ports.record)
        self.subreaper = False

    def _say(self, job: Job, kind: str, severity: Severity, message: str) -> None:
        self.runner.say(job, kind, severity, message)

    def _persist(self, job: Job) -> bool:
        return self.runner.persist(job)

    # --- start-up ------------------------------------------------------
    def start(self, entries: Iterable[JobEntry], facts: Facts) -> None:
        """Find the jobs of the previous daemon, then add config jobs not seen before."""
        self.runner.facts = facts
        for path in (self.files.jobs_dir, self.files.runtime_dir):
            path.mkdir(parents=True, exist_ok=True, mode=0o711)
            path.chmod(0o711)  # jobs must reach their snapshot and runtime files, not list them
        self.subreaper = become_subreaper()
        for rec in self.ports.records.jobs():
            try:
                job = Job.from_record(rec)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a record of any shape
                log.error("job_record_unreadable", record=str(rec)[:300], error=f"{type(exc).__name__}: {exc}")
                continue
            self.jobs[job.name] = job
        # every job is known before any is restarted: a job that ended while no
        # daemon ran must not be placed on a GPU a job adopted later still holds
        # (found by the chaos run)
        for job in list(self.jobs.values()):
            self._readopt(job)
        self.intake.offer_newest(j for j in self.jobs.values() if j.state not in FINAL)  # uploads a stop cut off
        default_restarts = self.ports.settings().max_restarts
        for entry in entries:
            if entry.name not in self.jobs:
                self._add(Job(jobspec.from_entry(entry, default_restarts)))

    def _readopt(self, job: Job) -> None:
        if job.state in FINAL:
            return
        self.intake.watch(job)
        a = job.attempt
        status = self.files.status(job.name, a.slot)
        if job.state not in ACTIVE or not a.pid or not a.start_time:
            self._end_strays(job, keep=None)
            return
        proc = adopt(a.pid, a.start_time, status_path=status, job_name=job.name)
        self._end_strays(job, keep=a.pid if proc is not None else None)
        stopping = job.state in (JobState.CHECKPOINTING, JobState.STOPPING)
        if stopping and not a.after_stop:
            a.after_stop = "restart"  # a stop whose purpose was not saved: restart, never lose the job
        if proc is not None:
            job.rt.proc = proc
            now = time.time()
            job.rt.clock = hang.Clock(started_at=a.started_at or now, last_progress=now, last_busy=now)
            self.runner.occupy(job)
            self._say(job, EventKind.JOB_ADOPTED, Severity.INFO, f"job {job.name} re-adopted (pid {a.pid}, attempt {a.number})")
            if stopping:
                self.runner.move(job, JobEvent.TERMINATING)
                self.runner.begin_stop(job, a.after_stop, a.reason or "stop resumed after a daemon restart", checkpoint=False)
            elif job.state == JobState.STARTING:
                self.runner.move(job, JobEvent.ADOPTED)
            else:
                self._persist(job)
            return
        code = exitcode.read_status(status)
        if stopping:
            job.rt.stop_result = StopResult(code, "already_exited", (), ())
            self.runner.finish_stop(job)
            return
        if job.state == JobState.STARTING:
            self.runner.move(job, JobEvent.ADOPTED)  # its process ran (it had a pid) and ended unseen
        self.runner.on_exit(job, code, "ended while gpuguardd was not running")

    def _end_strays(self, job: Job, keep: int | None) -> None:
        """An attempt the record does not know (a daemon killed between its spawn and its
        save) must not run beside the one that will start now: its wrappers, and, when
        no recorded attempt lives, the job's cgroup, are stopped. So is a warm standby of
        the previous daemon (the other slot): never adopted, a new one follows."""
        strays: list[tuple[int, float]] = []
        left: tuple[int, ...] = ()
        for slot in SLOTS:
            status = self.files.status(job.name, slot)
            found = [(pid, ct) for pid, ct in wrappers_of(status) if pid != keep]
            for pid, ct in found:
                stray = adopt(pid, ct, status_path=status)
                if stray is not None:
                    stray.stop(None, 0.0, self.ports.settings().stop_timeout_s)
            strays += found
            if keep is None or slot != job.attempt.slot:
                left += kill_cgroup_of(job.name, status)
        if strays or left:
            pids_text = ", ".join(str(pid) for pid in [p for p, _ in strays] + list(left))
            self._say(job, EventKind.JOB_LEFTOVERS_STOPPED, Severity.WARNING, f"job {job.name}: processes of an attempt its record did not know were stopped (pids {pids_text})")

    def _add(self, job: Job) -> bool:
        self.jobs[job.name] = job
        self.intake.watch(job)
        return self._persist(job)

    # --- requests from the control socket ------------------------------
    def submit(self, req: Mapping[str, Any], uid: int, gid: int, groups: tuple[int, ...]) -> Job:
        """`gpuguardctl run`: answered only once the job's record is saved."""
        spec = jobspec.from_request(req, uid, gid, groups, self.ports.settings().max_restarts)
        if not spec.workdir.is_dir():
            raise JobError(f"workdir {spec.workdir} is not an existing absolute directory", "bad_request")
        facts = self.ports.facts()  # before our lock: the daemon takes its lock, then ours
        with self.lock:
            old = self.jobs.get(spec.name)
            if old is not None and old.state not in FINAL:
                raise JobError(f"job {spec.name} exists and is {old.state.value}; stop it first", "refused")
            job = Job(spec)
            if not self._add(job):
                self.intake.watcher.unwatch(job.name)
                if old is None:
                    del self.jobs[job.name]
                else:
                    self.jobs[job.name] = old
                raise JobError(f"job {spec.name} not started: its record could not be saved (is the state dir's disk full?)")
            if old is not None and old.state != JobState.REQUEUED:
                # a new job of the same name starts from scratch; a requeued one that Slurm
                # placed here again resumes from its snapshots
                self.ring.remove_job(spec.name)
            self.runner.facts = facts
            self.runner.try_start(job, time.time())
            return job

    def stop(self, name: str, by: str) -> Job:
        with self.lock:
            job = self._job(name)
            if job.state in FINAL:
                return job
            job.attempt.reason = f"stopped by {by}"
            if job.state != JobState.STOPPING:
                self.runner.move(job, JobEvent.STOP_REQUESTED)
            if job.rt.stopping is not None:
                job.attempt.after_stop = "stopped"
            elif job.rt.proc is not None:
                self.runner.begin_stop(job, "stopped", job.attempt.reason, checkpoint=True)
            else:
                self.runner.move(job, JobEvent.STOPPED, EventKind.JOB_STOPPED, Severity.INFO, f"job {name} stopped by {by} (it was not running)")
            self._persist(job)
            return job

    def rollback(self, name: str, snapshot_id: str | None, by: str) -> dict[str, Any]:
        facts = self.ports.facts()  # before our lock: the daemon takes its lock, then ours
        with self.lock:
            job = self._job(name)
            if job.state == JobState.REQUEUEING:  # its requeue may be under way: it would run twice
                raise JobError(f"job {name} is being handed back to Slurm; stop it first", "refused")
            try:
                snap = self.ring.get(name, snapshot_id) if snapshot_id else self.ring.before_newest(name)
            except SnapshotCorrupt as exc:
                raise JobError(f"refused: {exc}; pick another with `gpuguardctl snapshots {name}`", "refused") from None
            if snap is None:
                raise JobError(
                    f"job {name} has no snapshot {snapshot_id}" if snapshot_id else f"job {name} has fewer than two valid snapshots",
                    "not_found",
                )
            a = job.attempt
            a.resume_pin = str(snap.path)
            a.pin_attempt = a.number
            a.reason = f"rollback to {snap.id} by {by}"
            if job.rt.stopping is not None:
                a.after_stop = "rollback"
            elif job.rt.proc is not None:
                self.runner.move(job, JobEvent.ROLLBACK)
                self.runner.begin_stop(job, "rollback", a.reason, checkpoint=False)
            else:
                self.runner.move(job, JobEvent.ROLLBACK)
                a.crashes = 0
                self.runner.facts = facts
                self.runner.try_start(job, time.time())
            self._persist(job)
            return {"name": name, "snapshot": snap.id, "path": str(snap.path), "state": job.state.value}

    def snapshots(self, name: str) -> list[dict[str, Any]]:
        """The ring's and the store's, each with `where` it is kept; no lock is held
        while the store is asked (at most remote.LIST_TIMEOUT_S)."""
        self._job(name)
        return remote.listing([s.to_json() for s in self.ring.list(name)], self.ports.storage, name)

    def _job(self, name: str) -> Job:
        job = self.jobs.get(name)
        if job is None:
            raise JobError(f"no job named {name!r}", "not_found")
        return job

    # --- the tick ------------------------------------------------------
    def tick(self, now: float, facts: Facts) -> None:
        with self.lock:
            self.runner.facts = facts
            for job in list(self.jobs.values()):
                try:
                    self._tick_job(job, now)
                except Exception:  # one job's trouble must not stop the others
                    log.exception("job_tick_failed", job=job.name)
            ours = {p for j in self.jobs.values() if j.rt.proc is not None for p in j.rt.proc.known}
            ours |= {j.attempt.pid for j in self.jobs.values() if j.attempt.pid}
            ours |= {j.rt.standby.pid for j in self.jobs.values() if j.rt.standby is not None}
            self.foreign.tick(facts, ours, self.ports.settings())

    def _tick_job(self, job: Job, now: float) -> None:
        if job.state in FINAL:
            return
        if job.state == JobState.REQUEUEING:
            self.runner.handoff.tick(job)
            return
        self.runner.standby.tick(job, now)
        rt = job.rt
        if rt.stopping is not None:
            if rt.stop_result is not None or not rt.stopping.is_alive():
                rt.stopping = None
                self.runner.finish_stop(job)
            return
        if rt.proc is not None:
            code = rt.proc.wait(0)
            if not rt.proc.alive():
                self.runner.on_exit(job, code if code is not None else rt.proc.exit_status(), None)
                return
            self.intake.read_checkpoint_file(job)
            settings = self.ports.settings()
            decision = decide(
                [self.runner.fact(uuid) for uuid in job.attempt.gpus],
                migrate_on_degraded=settings.migrate_on_degraded,
                handled=frozenset(rt.handled),
            )
            if decision is not None and self.runner.act(job, decision):
                return
            self._check_hang(job, now)
            return
        if job.state == JobState.BACKOFF and now >= (job.attempt.backoff_until or 0):
            self.runner.move(job, JobEvent.BACKOFF_OVER)
        if job.state in (JobState.STARTING, JobState.WAITING):
            self.runner.try_start(job, now)

    def _check_hang(self, job: Job, now: float) -> None:
        assert job.rt.proc is not None
        settings = self.ports.settings()
        clock = job.rt.clock or hang.Clock.start(job.attempt.started_at or now)
        procs = job.rt.proc.tree()  # also keeps the tree's known pids fresh
        samples = hang.Samples(
            heartbeat_mtime=_mtime(self.files.heartbeat(job.name)),
            checkpoint_mtime=_mtime(job.checkpoint) if job.checkpoint is not None else None,
            cpu_seconds=_cpu_seconds(procs) if clock.heartbeat_mtime is None else None,
        )
        limits = hang.Limits(settings.hang_timeout_s, settings.hang_startup_timeout_s, settings.hang_idle_util_pct)
        gpus = [self.runner.fact(uuid) for uuid in job.attempt.gpus]
        job.rt.clock, found = hang.assess(clock, samples, gpus, limits, now)
        if found is None:
            return
        culprit = job.attempt.gpus[0] if job.attempt.gpus else None
        self.runner.move(
            job, JobEvent.HANG, EventKind.HANG, Severity.ERROR,
            f"job {job.name} hung: its GPU(s) idle and no progress for {found.idle_for_s:.0f}s "
            f"(limit {found.limit_s:g}s); checkpoint, kill and restart",
            gpu=culprit,
        )
        self.ports.pool.job_hung(job.name, list(job.attempt.gpus))
        self.runner.begin_stop(
            job, "restart", "hang", checkpoint=True,
            grace_s=min(HANG_GRACE_S, settings.checkpoint_grace_s),
            term_timeout_s=min(HANG_TERM_S, settings.stop_timeout_s),
        )

    # --- views ---------------------------------------------------------
    def view(self) -> list[dict[str, Any]]:
        with self.lock:
            return [self._view(job) for job in sorted(self.jobs.values(), key=lambda j: j.name)]

    def _view(self, job: Job) -> dict[str, Any]:
        snapshots = self.ring.list(job.name)  # one directory read per job and status call
        newest = snapshots[0] if snapshots else None
        a, spec = job.attempt, job.spec
        return {
            "name": job.name,
            "state": job.state.value,
            "gpus": list(a.gpus) if job.state not in FINAL else [],
            "attempt": a.number,
            "restarts": a.restarts,
            "restarts_by_kind": {kind: a.restarts_by.get(kind, 0) for kind in RESTART_KINDS},
            "pid": a.pid if job.rt.proc is not None else None,
            "checkpoint": a.resume_pin or (str(newest.path) if newest else None),
            "checkpoint_path": str(job.checkpoint) if job.checkpoint else None,
            "checkpoint_age_s": round(time.time() - newest.created, 1) if newest else None,
            "snapshots": len(snapshots),
            "reason": a.reason,
            "exit_code": a.exit_code,
            "command": list(spec.command),
            "workdir": str(spec.workdir),
            "user": spec.user_name,
            "source": spec.source,
            "backoff_until": a.backoff_until if job.state == JobState.BACKOFF else None,
            "log": str(self.files.log(job.name)),
            "standby": self.runner.standby.view(job),
        }

    def jobs_on(self, uuid: str) -> list[str]:
        """The jobs holding this GPU now: a job waiting or in backoff has no process, and its
        GPUs are only a preference another job may take meanwhile."""
        idle = (JobState.WAITING, JobState.BACKOFF)
        return [j.name for j in self.jobs.values() if j.state not in FINAL and j.state not in idle and uuid in j.attempt.gpus]

    def close(self) -> None:
        """Daemon stop: the jobs keep running; only watchers and threads go, and the
        standbys (a new daemon would end them anyway: they are never adopted)."""
        with self.lock:
            for job in self.jobs.values():
                self.runner.standby.end(job)
        self.intake.close()


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except Exception:  # gone between listing and reading
            continue
    return total
