"""The supervisor: managed jobs that survive GPU faults.

It runs inside the daemon's main loop (`tick()`), reading the GPU verdicts
the monitor produced, and carries out what `policy.decide` says: checkpoint,
stop the whole tree, exclude or reset the GPU, restart on healthy GPUs from
the newest valid snapshot. Slow steps (a stop sequence with its grace, a GPU
reset) run on worker threads so the loop keeps ticking; their results are
picked up by the next tick. Every change of a job is written to the store,
so a restarted daemon finds its jobs again.
"""

from __future__ import annotations

import os
import pwd
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import structlog

from gpuguard import contract
from gpuguard.config import YOLO_SAVE_EVERY, JobEntry
from gpuguard.events import Event, EventKind
from gpuguard.health import xid as xid_catalog
from gpuguard.health.types import Action, GpuState, Severity
from gpuguard.supervisor import exitcode, foreign
from gpuguard.supervisor.policy import Decision, GpuView, Reaction, app_xid_key, backoff_s, decide
from gpuguard.supervisor.process import JobProcess, StopResult, UserSpec, adopt, become_subreaper, spawn
from gpuguard.supervisor.snapshots import SnapshotRing
from gpuguard.supervisor.states import ACTIVE, FINAL, JobEvent, JobState, transition
from gpuguard.supervisor.watch import CheckpointWatcher

if TYPE_CHECKING:
    from gpuguard.config import Config
    from gpuguard.daemon.service import Daemon

log = structlog.get_logger("gpuguard.supervisor")

HANG_GRACE_S = 10.0  # a hung trainer gets this long (at most) to checkpoint
HANG_TERM_S = 2.0  # ... and this long (at most) after SIGTERM: a hung process rarely acts on it
HANGS_TO_EXCLUDE = 2  # hangs on the same GPU before it leaves the pool
CPU_PROGRESS_S = 0.05  # CPU seconds per tick that count as progress for jobs without a heartbeat
TAIL_BYTES = 4096


class JobError(Exception):
    """A request about jobs that cannot be done; the message says why."""

    def __init__(self, message: str, code: str = "failed") -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Job:
    """A job's blueprint (name .. source) and the state of its current attempt."""

    name: str
    command: list[str]
    workdir: Path
    env: dict[str, str]
    user: UserSpec | None
    user_name: str | None
    gpus_wanted: int
    min_gpus: int | None
    checkpoint: Path | None
    max_restarts: int
    source: str  # "config" | "cli"
    state: JobState = JobState.STARTING
    attempt: int = 0
    restarts: int = 0
    crashes: int = 0  # consecutive crashes, for the backoff
    gpus: list[str] = field(default_factory=list)
    pid: int | None = None
    start_time: float | None = None
    started_at: float | None = None
    backoff_until: float | None = None
    reason: str | None = None
    exit_code: int | None = None
    after_stop: str | None = None  # "restart" | "stopped" | "rollback"
    resume_pin: str | None = None  # a rollback's snapshot, until a later attempt saves a newer one
    pin_attempt: int = 0  # the attempt running when the rollback was asked: its late checkpoints do not count
    pending_resets: list[str] = field(default_factory=list)  # GPUs to reset once the job is off them
    # runtime only
    proc: JobProcess | None = None
    stopping: threading.Thread | None = None
    stop_result: StopResult | None = None
    handled: set[tuple[object, ...]] = field(default_factory=set)
    last_progress: float = 0.0
    last_busy: float = 0.0
    heartbeat_mtime: float | None = None
    checkpoint_mtime: float | None = None
    cpu_time: float | None = None
    waiting_reported: bool = False

    def record(self) -> dict[str, Any]:
        """What the store keeps, enough to find the job again after a restart."""
        return {
            "name": self.name,
            "command": self.command,
            "workdir": str(self.workdir),
            "env": self.env,
            "user": None if self.user is None else [self.user.uid, self.user.gid, list(self.user.groups)],
            "user_name": self.user_name,
            "gpus_wanted": self.gpus_wanted,
            "min_gpus": self.min_gpus,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "max_restarts": self.max_restarts,
            "source": self.source,
            "state": self.state.value,
            "attempt": self.attempt,
            "restarts": self.restarts,
            "crashes": self.crashes,
            "gpus": self.gpus,
            "pid": self.pid,
            "start_time": self.start_time,
            "started_at": self.started_at,
            "backoff_until": self.backoff_until,
            "reason": self.reason,
            "exit_code": self.exit_code,
            "after_stop": self.after_stop,
            "resume_pin": self.resume_pin,
            "pin_attempt": self.pin_attempt,
            "pending_resets": self.pending_resets,
        }

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Job:
        user = rec.get("user")
        return cls(
            name=rec["name"],
            command=list(rec["command"]),
            workdir=Path(rec["workdir"]),
            env=dict(rec.get("env") or {}),
            user=UserSpec(user[0], user[1], tuple(user[2])) if user else None,
            user_name=rec.get("user_name"),
            gpus_wanted=int(rec.get("gpus_wanted", 1)),
            min_gpus=rec.get("min_gpus"),
            checkpoint=Path(rec["checkpoint"]) if rec.get("checkpoint") else None,
            max_restarts=int(rec.get("max_restarts", 10)),
            source=rec.get("source", "cli"),
            state=JobState(rec["state"]),
            attempt=int(rec.get("attempt", 0)),
            restarts=int(rec.get("restarts", 0)),
            crashes=int(rec.get("crashes", 0)),
            gpus=list(rec.get("gpus") or []),
            pid=rec.get("pid"),
            start_time=rec.get("start_time"),
            started_at=rec.get("started_at"),
            backoff_until=rec.get("backoff_until"),
            reason=rec.get("reason"),
            exit_code=rec.get("exit_code"),
            after_stop=rec.get("after_stop"),
            resume_pin=rec.get("resume_pin"),
            pin_attempt=int(rec.get("pin_attempt", 0)),
            pending_resets=list(rec.get("pending_resets") or []),
        )


class Supervisor:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        state_dir = daemon.config.daemon.state_dir
        self.jobs_dir = state_dir / "jobs"
        self.runtime_dir = daemon.config.daemon.socket.parent / "jobs"
        self.ring = SnapshotRing(
            state_dir / "snapshots",
            keep_newest=daemon.config.jobs.snapshots_keep,
            max_bytes=daemon.config.jobs.snapshots_max_bytes,
        )
        self.watcher = CheckpointWatcher()
        self.jobs: dict[str, Job] = {}
        self.lock = threading.RLock()
        self.hangs: dict[str, int] = {}  # GPU uuid -> hangs seen on it
        self.probation: dict[str, float] = {}  # GPU uuid -> when it may return to the pool
        self.foreign_judged: set[tuple[str, int]] = set()  # (GPU uuid, pid): each foreign holder once per fault
        self.subreaper = False

    @property
    def config(self) -> Config:
        """The daemon's current config: a SIGHUP reload reaches the next decision."""
        return self.daemon.config

    # --- start-up ------------------------------------------------------
    def start(self) -> None:
        """Find the jobs of the previous daemon, then add config jobs not seen before."""
        for path in (self.jobs_dir, self.runtime_dir):
            path.mkdir(parents=True, exist_ok=True, mode=0o711)
        for path in (self.daemon.config.daemon.state_dir, self.ring.root, self.jobs_dir, self.runtime_dir):
            path.chmod(0o711)  # jobs must reach their snapshot and runtime files, not list them
        self.subreaper = become_subreaper()
        for rec in self.daemon.store.jobs():
            try:
                job = Job.from_record(rec)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("job_record_unreadable", record=str(rec)[:300], error=str(exc))
                continue
            self.jobs[job.name] = job
        # every job is known before any is restarted: a job that ended while no
        # daemon ran must not be placed on a GPU a job adopted later still holds
        # (found by the chaos run)
        for job in list(self.jobs.values()):
            self._readopt(job)
        for spec in self.config.job:
            if spec.name not in self.jobs:
                self._add(self._from_spec(spec))

    def _readopt(self, job: Job) -> None:
        if job.state in FINAL:
            return
        self._watch_checkpoint(job)
        if job.state in ACTIVE and job.pid and job.start_time:
            proc = adopt(job.pid, job.start_time, status_path=self._status_path(job))
            if proc is not None:
                job.proc = proc
                self._attach(job)
                job.last_progress = job.last_busy = time.time()
                self._event(job, "job_adopted", Severity.INFO, f"job {job.name} re-adopted (pid {job.pid}, attempt {job.attempt})")
                if job.state in (JobState.CHECKPOINTING, JobState.STOPPING) and job.after_stop:
                    self._begin_stop(job, job.after_stop, job.reason or "stop resumed after a daemon restart", checkpoint=False)
                elif job.state == JobState.STARTING:
                    job.state = JobState.RUNNING
                self._persist(job)
                return
            code = exitcode.read_status(self._status_path(job))
            note = "ended while gpuguardd was not running"
            if job.state in (JobState.CHECKPOINTING, JobState.STOPPING) and job.after_stop:
                job.state = JobState.STOPPING
                job.stop_result = StopResult(code, "already_exited", (), ())
                self._finish_stop(job)
                return
            job.state = JobState.RUNNING
            self._on_exit(job, code, note)

    def _from_spec(self, spec: JobEntry) -> Job:
        user = UserSpec.lookup(spec.user) if spec.user else None
        workdir = spec.workdir or Path("/")
        checkpoint = spec.checkpoint
        if checkpoint is not None and not checkpoint.is_absolute():
            checkpoint = workdir / checkpoint
        env = self._base_env(spec.user) | dict(spec.env)
        yolo = dict(spec.yolo)
        every = yolo.pop(YOLO_SAVE_EVERY, None)
        command = list(spec.command) or [
            str(Path(sys.executable).parent / "gpuguard-yolo"),
            "train",
            *(["--save-every-s", every] if every is not None else []),
            *(f"{key}={value}" for key, value in yolo.items()),
        ]
        return Job(
            name=spec.name,
            command=command,
            workdir=workdir,
            env=env,
            user=user,
            user_name=spec.user,
            gpus_wanted=spec.gpus,
            min_gpus=spec.min_gpus,
            checkpoint=checkpoint,
            max_restarts=spec.max_restarts if spec.max_restarts is not None else self.config.jobs.max_restarts,
            source="config",
        )

    @staticmethod
    def _base_env(user: str | None) -> dict[str, str]:
        """A minimal login-like environment for config jobs."""
        env = {"PATH": os.environ.get("PATH", os.defpath), "LANG": os.environ.get("LANG", "C.UTF-8")}
        if user:
            entry = pwd.getpwnam(user)
            env |= {"HOME": entry.pw_dir, "USER": entry.pw_name, "LOGNAME": entry.pw_name}
        return env

    # --- requests from the control socket ------------------------------
    def submit(self, spec: Mapping[str, Any], uid: int, gid: int, groups: tuple[int, ...]) -> Job:
        """`gpuguardctl run`: the command runs as the caller (root only if root asked)."""
        name = str(spec.get("name") or "")
        if not contract.valid_job_name(name):
            raise JobError(f"bad job name {name!r}: letters, digits, '_', '.', '-', at most 64", "bad_request")
        command = spec.get("command") or []
        if not command or not all(isinstance(a, str) for a in command):
            raise JobError("run needs a command after --", "bad_request")
        gpus = int(spec.get("gpus") or 1)
        min_gpus = spec.get("min_gpus")
        if gpus < 1 or (min_gpus is not None and not 1 <= int(min_gpus) <= gpus):
            raise JobError("--gpus must be >= 1 and --min-gpus between 1 and --gpus", "bad_request")
        workdir = Path(spec.get("workdir") or "/")
        if not workdir.is_absolute() or not workdir.is_dir():
            raise JobError(f"workdir {workdir} is not an existing absolute directory", "bad_request")
        checkpoint = Path(spec["checkpoint"]) if spec.get("checkpoint") else None
        if checkpoint is not None and not checkpoint.is_absolute():
            checkpoint = workdir / checkpoint
        with self.lock:
            old = self.jobs.get(name)
            if old is not None and old.state not in FINAL:
                raise JobError(f"job {name} exists and is {old.state.value}; stop it first", "refused")
            try:
                user_name = pwd.getpwuid(uid).pw_name
            except KeyError:
                user_name = str(uid)
            job = Job(
                name=name,
                command=list(command),
                workdir=workdir,
                env={k: str(v) for k, v in (spec.get("env") or {}).items()},
                user=None if uid == 0 else UserSpec(uid, gid, tuple(g for g in groups if g != gid)),
                user_name=user_name,
                gpus_wanted=gpus,
                min_gpus=int(min_gpus) if min_gpus is not None else None,
                checkpoint=checkpoint,
                max_restarts=int(spec["max_restarts"]) if spec.get("max_restarts") is not None else self.config.jobs.max_restarts,
                source="cli",
            )
            if old is not None:
                self.ring.remove_job(name)  # a new job of the same name starts from scratch
            self._add(job)
            self._try_start(job, time.time())
            return job

    def _add(self, job: Job) -> None:
        self.jobs[job.name] = job
        self._watch_checkpoint(job)
        self._persist(job)

    def stop(self, name: str, by: str) -> Job:
        with self.lock:
            job = self._job(name)
            if job.state in FINAL:
                return job
            job.reason = f"stopped by {by}"
            if job.proc is not None and job.stopping is None:
                self._begin_stop(job, "stopped", job.reason, checkpoint=True)
            elif job.stopping is not None:
                job.after_stop = "stopped"
            else:
                job.state = transition(job.state, JobEvent.STOP_REQUESTED)
                job.state = JobState.STOPPED
                self._release(job)
                self._event(job, "job_stopped", Severity.INFO, f"job {name} stopped by {by} (it was not running)")
            self._persist(job)
            return job

    def rollback(self, name: str, snapshot_id: str | None, by: str) -> dict[str, Any]:
        with self.lock:
            job = self._job(name)
            snap = self.ring.get(name, snapshot_id) if snapshot_id else self.ring.before_newest(name)
            if snap is None:
                raise JobError(
                    f"job {name} has no snapshot {snapshot_id}" if snapshot_id else f"job {name} has fewer than two snapshots",
                    "not_found",
                )
            job.resume_pin = str(snap.path)
            job.pin_attempt = job.attempt
            job.reason = f"rollback to {snap.id} by {by}"
            if job.proc is not None and job.stopping is None:
                # no checkpoint: one taken now would be newer than the snapshot asked for
                self._begin_stop(job, "rollback", job.reason, checkpoint=False)
            elif job.stopping is not None:
                job.after_stop = "rollback"
            else:
                job.state = transition(job.state, JobEvent.ROLLBACK)
                job.crashes = 0
                self._try_start(job, time.time())
            self._persist(job)
            return {"name": name, "snapshot": snap.id, "path": str(snap.path), "state": job.state.value}

    def snapshots(self, name: str) -> list[dict[str, Any]]:
        self._job(name)
        return [s.to_json() for s in self.ring.list(name)]

    def _job(self, name: str) -> Job:
        job = self.jobs.get(name)
        if job is None:
            raise JobError(f"no job named {name!r}", "not_found")
        return job

    # --- the tick ------------------------------------------------------
    def tick(self, now: float) -> None:
        with self.lock:
            for job in list(self.jobs.values()):
                try:
                    self._tick_job(job, now)
                except Exception:  # one job's trouble must not stop the others
                    log.exception("job_tick_failed", job=job.name)
            self._signal_foreign_holders()
            self._end_probations(now)

    def _tick_job(self, job: Job, now: float) -> None:
        if job.state in FINAL:
            return
        if job.stopping is not None:
            if job.stop_result is not None or not job.stopping.is_alive():
                job.stopping = None
                self._finish_stop(job)
            return
        if job.proc is not None:
            code = job.proc.wait(0)
            if not job.proc.alive():
                self._on_exit(job, code if code is not None else job.proc.exit_status(), None)
                return
            self._read_checkpoint_file(job)
            decision = decide(
                [self._view(uuid) for uuid in job.gpus],
                migrate_on_degraded=self.config.jobs.migrate_on_degraded,
                handled=frozenset(job.handled),
            )
            if decision is not None and self._act(job, decision, now):
                return
            self._check_hang(job, now)
            return
        if job.state == JobState.BACKOFF and now >= (job.backoff_until or 0):
            job.state = transition(job.state, JobEvent.BACKOFF_OVER)
        if job.state in (JobState.STARTING, JobState.WAITING):
            self._try_start(job, now)

    def _view(self, uuid: str) -> GpuView:
        state, reason = self.daemon.gpu_state(uuid)
        verdict = self.daemon.monitor.verdict(uuid) if self.daemon.monitor else None
        app_xids: tuple[tuple[int, float], ...] = ()
        track = self.daemon.monitor.tracks.get(uuid) if self.daemon.monitor else None
        if track is not None:
            recovery = track.snapshot.recovery_action if track.snapshot else None
            app_xids = tuple(
                (x.xid, x.timestamp)
                for x in track.xids
                if not x.historical and xid_catalog.resolve(xid_catalog.lookup(x.xid), recovery)[0] == Action.RESTART_APP
            )
        return GpuView(uuid, state, verdict.action if verdict else Action.NONE, reason, app_xids)

    def _act(self, job: Job, decision: Decision, now: float) -> bool:
        """Carry out a decision; False when it cannot be done now (migrate with no free GPU)."""
        if decision.reaction == Reaction.MIGRATE and len(self._free_gpus(exclude_job=job)) < len(job.gpus):
            return False
        job.handled.add(decision.key)
        if decision.exclude:
            self._exclude(decision.gpu, decision.reason)
        if decision.node_hook:
            self.daemon.node_unhealthy(decision.reason)
        if decision.reset:
            job.pending_resets.append(decision.gpu)
        what = {
            Reaction.RESTART_SAME: "restart on the same GPU",
            Reaction.MOVE: "move to a healthy GPU",
            Reaction.MIGRATE: "migrate off a degraded GPU",
        }[decision.reaction]
        self._event(
            job,
            "checkpoint_requested",
            Severity.WARNING,
            f"job {job.name}: GPU {self._index(decision.gpu)} {decision.reason}: checkpoint, then {what}",
            gpu=decision.gpu,
        )
        job.state = transition(job.state, JobEvent.FAULT)
        self._begin_stop(job, "restart", decision.reason, checkpoint=True)
        return True

    # --- hangs ---------------------------------------------------------
    def _check_hang(self, job: Job, now: float) -> None:
        """A hang: every GPU of the job idle while the job shows no progress, for hang_timeout_s."""
        assert job.proc is not None
        progress = False
        started = job.started_at or 0.0
        # only this attempt's heartbeats and checkpoint writes count
        mtime = _mtime(self._runtime(job) / "heartbeat")
        if mtime is not None and mtime > started and mtime != job.heartbeat_mtime:
            progress = True
            job.heartbeat_mtime = mtime
        if job.checkpoint is not None:
            cmt = _mtime(job.checkpoint)
            if cmt is not None and cmt > started and cmt != job.checkpoint_mtime:
                progress = True
                job.checkpoint_mtime = cmt
        procs = job.proc.tree()  # also keeps the tree's known pids fresh
        if job.heartbeat_mtime is None:  # no heartbeat yet: CPU time is the best sign of life
            cpu = _cpu_seconds(procs)
            if job.cpu_time is not None and cpu - job.cpu_time >= CPU_PROGRESS_S:
                progress = True
            job.cpu_time = cpu
        if progress:
            job.last_progress = now
        for uuid in job.gpus:
            snap = self.daemon.monitor.tracks[uuid].snapshot if self.daemon.monitor else None
            util = snap.gpu_util_pct if snap is not None else None
            if util is None or util > self.config.monitor.hang_idle_util_pct:
                job.last_busy = now
        idle_for = now - max(job.last_progress, job.last_busy, job.started_at or now)
        # a trainer starting up (imports, data, CUDA init) may sit idle for long: a
        # longer limit applies until its first heartbeat or checkpoint
        started_up = job.heartbeat_mtime is not None or job.checkpoint_mtime is not None
        limit = self.config.monitor.hang_timeout_s if started_up else max(
            self.config.monitor.hang_timeout_s, self.config.monitor.hang_startup_timeout_s
        )
        if idle_for < limit:
            return
        culprit = job.gpus[0] if job.gpus else None
        for uuid in job.gpus:
            self.hangs[uuid] = self.hangs.get(uuid, 0) + 1
        message = (
            f"job {job.name} hung: its GPU(s) idle and no progress for {idle_for:.0f}s "
            f"(limit {limit:g}s); checkpoint, kill and restart"
        )
        self._event(job, "hang", Severity.ERROR, message, gpu=culprit)
        for uuid in job.gpus:
            if self.hangs[uuid] >= HANGS_TO_EXCLUDE:
                self._exclude(uuid, f"{self.hangs[uuid]} hangs of jobs on this GPU")
        job.state = transition(job.state, JobEvent.HANG)
        self._begin_stop(
            job,
            "restart",
            "hang",
            checkpoint=True,
            grace_s=min(HANG_GRACE_S, self.config.jobs.checkpoint_grace_s),
            term_timeout_s=min(HANG_TERM_S, self.config.jobs.stop_timeout_s),
        )

    # --- stopping ------------------------------------------------------
    def _begin_stop(
        self,
        job: Job,
        after: str,
        reason: str,
        *,
        checkpoint: bool,
        grace_s: float | None = None,
        term_timeout_s: float | None = None,
    ) -> None:
        """Run the contract's stop sequence on a worker thread."""
        assert job.proc is not None
        proc = job.proc
        job.after_stop = after
        job.reason = reason
        job.stop_result = None
        if after == "stopped" or not checkpoint:
            job.state = JobState.STOPPING
        elif job.state == JobState.RUNNING:
            job.state = JobState.CHECKPOINTING
        sig = signal.Signals[self.config.jobs.checkpoint_signal] if checkpoint else None
        grace = self.config.jobs.checkpoint_grace_s if grace_s is None else grace_s
        term = self.config.jobs.stop_timeout_s if term_timeout_s is None else term_timeout_s

        def on_phase(phase: str) -> None:
            if phase in ("term", "kill"):
                with self.lock:
                    if job.state == JobState.CHECKPOINTING:
                        job.state = transition(job.state, JobEvent.TERMINATING)
                        self._persist(job)

        def run() -> None:
            result = proc.stop(sig, grace, term, on_phase)
            with self.lock:
                job.stop_result = result
            self.daemon.wake()  # finish the stop at once, not at the next poll

        job.stopping = threading.Thread(target=run, name=f"stop-{job.name}", daemon=True)
        job.stopping.start()
        self._persist(job)

    def _finish_stop(self, job: Job) -> None:
        result = job.stop_result or StopResult(None, None, (), ())
        code = result.returncode
        if result.survivors:
            self._event(
                job,
                "job_stop_incomplete",
                Severity.ERROR,
                f"job {job.name}: processes survived SIGKILL: {', '.join(map(str, result.survivors))}",
            )
        holders = self._gpu_holders(job, result)
        after = job.after_stop
        job.after_stop = None
        job.exit_code = code
        self._detach(job)
        job.proc = None
        job.pid = job.start_time = None
        self._ingest_checkpoint(job)
        for uuid in job.pending_resets:
            self.daemon.schedule_reset(uuid, by=f"gpuguard (job {job.name})")
        job.pending_resets = []
        if after == "stopped":
            job.state = JobState.STOPPED
            self._release(job)
            self._event(job, "job_stopped", Severity.INFO, f"job {job.name} stopped ({_ended(result)}){holders}")
        elif after == "restart" and code == 0 and result.phase in ("checkpoint", "already_exited"):
            job.state = JobState.SUCCEEDED
            self._release(job)
            self._event(job, "job_succeeded", Severity.INFO, f"job {job.name} finished (exit 0) while being stopped{holders}")
        else:
            if after == "rollback":
                job.crashes = 0
            job.state = JobState.STARTING
            job.restarts += 1
            self._event(job, "job_stopping_done", Severity.INFO, f"job {job.name} stopped for a restart ({_ended(result)}){holders}")
            self._try_start(job, time.time())
        self._persist(job)

    def _gpu_holders(self, job: Job, result: StopResult) -> str:
        """After a stop: does NVML still list one of the job's processes on its GPUs?"""
        if not self.daemon.monitor or not result.survivors:
            return ""
        held = []
        for uuid in job.gpus:
            snap = self.daemon.monitor.tracks[uuid].snapshot
            for p in snap.processes if snap else ():
                if p.pid in result.survivors:
                    held.append(f"pid {p.pid} on GPU {self._index(uuid)}")
        return f"; still holding GPU memory: {', '.join(held)}" if held else ""

    # --- exits ---------------------------------------------------------
    def _on_exit(self, job: Job, code: int | None, note: str | None) -> None:
        job.exit_code = code
        ran_s = time.time() - (job.started_at or time.time())
        self._detach(job)
        job.proc = None
        job.pid = job.start_time = None
        self._ingest_checkpoint(job)
        where = f" ({note})" if note else ""
        if code == 0:
            job.state = transition(job.state, JobEvent.EXITED_OK)
            job.reason = None
            self._release(job)
            self._event(job, "job_succeeded", Severity.INFO, f"job {job.name} succeeded after {job.attempt} attempt(s){where}")
        elif code == contract.EX_TEMPFAIL:
            job.state = transition(job.state, JobEvent.EXITED_RESTART)
            job.restarts += 1
            self._event(job, "job_stopping_done", Severity.INFO, f"job {job.name} saved a checkpoint and asked for a restart (exit 75){where}")
            self._try_start(job, time.time())
        else:
            if ran_s >= self.config.jobs.stable_after_s:
                job.crashes = 0
            job.crashes += 1
            what = "exit status unknown" if code is None else (f"killed by signal {-code}" if code < 0 else f"exit {code}")
            tail = self._tail(job)
            if job.restarts >= job.max_restarts:
                job.state = transition(job.state, JobEvent.GAVE_UP)
                job.reason = f"{what}; gave up after {job.restarts} restart(s) (max_restarts {job.max_restarts})"
                self._release(job)
                self._event(job, "job_failed", Severity.ERROR, f"job {job.name} failed: {job.reason}{where}", data={"output_tail": tail})
            else:
                delay = backoff_s(job.crashes, self.config.jobs.backoff_initial_s, self.config.jobs.backoff_max_s)
                job.state = transition(job.state, JobEvent.CRASHED)
                job.backoff_until = time.time() + delay
                job.restarts += 1
                job.reason = f"{what}; restart {job.restarts} of {job.max_restarts} in {delay:g}s"
                self._release(job)
                self._event(job, "job_crashed", Severity.WARNING, f"job {job.name} crashed: {job.reason}{where}", data={"output_tail": tail, "backoff_s": delay})
        self._persist(job)

    def _tail(self, job: Job) -> str:
        try:
            with open(self._log_path(job), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - TAIL_BYTES))
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-10:])

    # --- starting ------------------------------------------------------
    def _free_gpus(self, exclude_job: Job | None = None) -> list[str]:
        """Healthy GPUs no active job holds, in index order."""
        taken = {
            uuid
            for j in self.jobs.values()
            if j is not exclude_job and (j.proc is not None or j.state in ACTIVE)
            for uuid in j.gpus
        }
        monitor = self.daemon.monitor
        assert monitor is not None
        return [
            uuid
            for uuid, track in sorted(monitor.tracks.items(), key=lambda kv: kv[1].info.index)
            if uuid not in taken and self.daemon.gpu_state(uuid)[0] == GpuState.HEALTHY
        ]

    def _pick_gpus(self, job: Job) -> list[str] | None:
        free = self._free_gpus(exclude_job=job)
        preferred = [g for g in job.gpus if g in free]  # stay where it was when that is fine
        ordered = preferred + [g for g in free if g not in preferred]
        if len(ordered) >= job.gpus_wanted:
            return ordered[: job.gpus_wanted]
        if job.min_gpus is not None and len(ordered) >= job.min_gpus:
            return ordered
        return None

    def _try_start(self, job: Job, now: float) -> None:
        gpus = self._pick_gpus(job)
        if gpus is None:
            if job.state != JobState.WAITING:
                job.state = transition(job.state, JobEvent.NO_GPUS) if job.state == JobState.STARTING else JobState.WAITING
            if not job.waiting_reported:
                job.waiting_reported = True
                job.gpus = []
                self._event(
                    job,
                    "job_waiting",
                    Severity.WARNING,
                    f"job {job.name} is waiting: it needs {job.min_gpus or job.gpus_wanted} healthy GPU(s) and none can take it now",
                )
                self._persist(job)
            return
        if job.state == JobState.WAITING:
            job.state = transition(job.state, JobEvent.GPUS_FREE)
        job.waiting_reported = False
        job.gpus = gpus
        resume = self._resume_from(job)
        job.attempt += 1
        runtime = self._runtime(job)
        try:
            self._prepare_dirs(job)
            env = self._job_env(job, resume, runtime)
            proc = spawn(job.command, env=env, cwd=job.workdir, user=job.user, log_path=self._log_path(job), status_path=self._status_path(job))
        except (OSError, ValueError) as exc:
            job.state = JobState.FAILED
            job.reason = f"cannot start: {exc}"
            self._release(job)
            self._event(job, "job_failed", Severity.ERROR, f"job {job.name} failed to start: {exc}")
            self._persist(job)
            return
        job.proc = proc
        job.pid, job.start_time = proc.pid, proc.start_time
        job.started_at = job.last_progress = job.last_busy = now
        job.heartbeat_mtime = job.checkpoint_mtime = job.cpu_time = None
        # restart-the-app Xids already on these GPUs (the one that caused this restart, or one from
        # before the job came) stay in their window for a while: they are not this attempt's business
        job.handled = {key for uuid in gpus if (key := app_xid_key(self._view(uuid))) is not None}
        job.backoff_until = None
        job.state = transition(job.state, JobEvent.SPAWNED)
        self._attach(job)
        gpu_text = ", ".join(f"GPU {self._index(u)}" for u in gpus)
        resumed = f", resuming from {resume}" if resume else ""
        if job.attempt == 1:
            self._event(job, "job_started", Severity.INFO, f"job {job.name} started on {gpu_text} (pid {proc.pid}){resumed}")
        else:
            self._event(
                job,
                "job_restarted",
                Severity.INFO,
                f"job {job.name} attempt {job.attempt} started on {gpu_text} (pid {proc.pid}){resumed}",
                data={"resume_from": resume, "attempt": job.attempt},
            )
        self._persist(job)

    def _resume_from(self, job: Job) -> str | None:
        if job.resume_pin and Path(job.resume_pin).exists():
            return job.resume_pin
        snap = self.ring.newest_valid(job.name)
        return str(snap.path) if snap else None

    def _job_env(self, job: Job, resume: str | None, runtime: Path) -> dict[str, str]:
        env = {k: v for k, v in job.env.items() if contract.for_job(k)}
        env |= {
            "CUDA_VISIBLE_DEVICES": ",".join(job.gpus),
            "GPUGUARD_JOB": job.name,
            "GPUGUARD_ATTEMPT": str(job.attempt),
            "GPUGUARD_CHECKPOINT_SIGNAL": self.config.jobs.checkpoint_signal,
            "GPUGUARD_HEARTBEAT": str(runtime / "heartbeat"),
            "GPUGUARD_CHECKPOINT_FILE": str(runtime / "checkpoint-path"),
        }
        if resume:
            env["GPUGUARD_RESUME_FROM"] = resume
        # stock torchrun dies of the checkpoint signal and orphans its workers;
        # told to handle it, its agent passes it on to every worker (docs/DDP.md)
        env.setdefault("PET_SIGNALS_TO_HANDLE", f"SIGTERM,SIGINT,SIGHUP,SIGQUIT,{self.config.jobs.checkpoint_signal}")
        return env

    def _prepare_dirs(self, job: Job) -> None:
        (self.jobs_dir / job.name).mkdir(mode=0o700, exist_ok=True)
        runtime = self._runtime(job)
        runtime.mkdir(mode=0o700, exist_ok=True)
        if job.user is not None and os.geteuid() == 0:
            os.chown(runtime, job.user.uid, job.user.gid)

    # --- checkpoints ---------------------------------------------------
    def _watch_checkpoint(self, job: Job) -> None:
        if job.checkpoint is not None:
            self.watcher.watch(job.name, job.checkpoint, self._on_checkpoint)

    def _read_checkpoint_file(self, job: Job) -> None:
        """A trainer may say where its checkpoint is (GPUGUARD_CHECKPOINT_FILE)."""
        if job.checkpoint is not None:
            return
        try:
            text = (self._runtime(job) / "checkpoint-path").read_text(errors="replace").strip()
        except OSError:
            return
        path = Path(text)
        if text and path.is_absolute():
            job.checkpoint = path
            self._watch_checkpoint(job)
            self._persist(job)
            log.info("job_checkpoint_path", job=job.name, checkpoint=text)

    def _on_checkpoint(self, name: str, path: Path) -> None:
        """Watcher thread: a checkpoint write looks complete."""
        job = self.jobs.get(name)
        if job is not None:
            self._snapshot(job, path)

    def _ingest_checkpoint(self, job: Job) -> None:
        """Right after the job ended: take the checkpoint it may just have written."""
        self._read_checkpoint_file(job)
        if job.checkpoint is not None and job.checkpoint.exists():
            self._snapshot(job, job.checkpoint)

    def _snapshot(self, job: Job, path: Path) -> None:
        result = self.ring.add(job.name, path, job_workdir=job.workdir, meta={"attempt": job.attempt})
        if result.saved and result.snapshot is not None:
            if job.attempt > job.pin_attempt:
                # newer work supersedes a rollback; a checkpoint the rolled-back attempt
                # wrote just before its stop (seen late by the watcher) does not
                job.resume_pin = None
            self._event(job, "snapshot_saved", Severity.INFO, f"job {job.name}: checkpoint {path} saved as snapshot {result.snapshot.id}")
        elif result.snapshot is None:
            self._event(job, "snapshot_rejected", Severity.WARNING, f"job {job.name}: checkpoint {path} not kept: {result.reason}")

    # --- GPUs ----------------------------------------------------------
    def _exclude(self, uuid: str, reason: str) -> None:
        if uuid in self.daemon.excluded:
            return
        self.daemon.exclude_gpu(uuid, reason, by="gpuguard")

    def _end_probations(self, now: float) -> None:
        for uuid, until in list(self.probation.items()):
            state, _ = self.daemon.gpu_state(uuid)
            verdict = self.daemon.monitor.verdict(uuid) if self.daemon.monitor else None
            entry = self.daemon.excluded.get(uuid)
            if entry is None or entry.by != "gpuguard":
                del self.probation[uuid]  # an operator took over
                continue
            if verdict is not None and verdict.state != GpuState.HEALTHY:
                del self.probation[uuid]
                self.daemon.record(
                    Event(kind="gpu_probation_failed", severity=Severity.ERROR, gpu=uuid,
                          message=f"GPU {self._index(uuid)} failed probation after its reset ({verdict.reason}); it stays excluded")
                )
                continue
            if now >= until:
                del self.probation[uuid]
                self.hangs.pop(uuid, None)
                self.daemon.include_gpu(uuid, by="gpuguard", why=f"healthy for {self.config.reset.probation_s:g}s after its reset")

    def start_probation(self, uuid: str) -> None:
        self.probation[uuid] = time.time() + self.config.reset.probation_s

    def _signal_foreign_holders(self) -> None:
        """Processes gpuguard did not start on a faulted GPU get the checkpoint signal,
        once, and only when they handle it and are not on [jobs] foreign_never_signal
        (the signal's default action would kill them); either way an event names them."""
        monitor = self.daemon.monitor
        if monitor is None:
            return
        ours = {p for j in self.jobs.values() if j.proc is not None for p in j.proc._known} | {
            j.pid for j in self.jobs.values() if j.pid
        }
        jobs_config = self.config.jobs
        sig = signal.Signals[jobs_config.checkpoint_signal]
        never = frozenset(jobs_config.foreign_never_signal)
        faulted = {
            uuid: (track, track.snapshot)
            for uuid, track in monitor.tracks.items()
            if track.verdict is not None and track.verdict.state == GpuState.FAULTED and track.snapshot is not None
        }
        # once per fault: a GPU that recovered and faults again asks its holders again
        self.foreign_judged = {(uuid, pid) for uuid, pid in self.foreign_judged if uuid in faulted}
        for uuid, (track, snapshot) in faulted.items():
            for p in snapshot.processes:
                if p.pid in ours or p.pid == os.getpid() or (uuid, p.pid) in self.foreign_judged:
                    continue
                if not psutil.pid_exists(p.pid):  # gone since the poll listed it
                    continue
                self.foreign_judged.add((uuid, p.pid))
                verdict, create_time = foreign.judge(p.pid, sig, never)
                why_not = verdict.reason
                if verdict.send and create_time is not None:
                    why_not = foreign.send(p.pid, create_time, sig) or ""
                who = f"pid {p.pid} ({verdict.name}, not a gpuguard job) holds faulted GPU {track.info.index}"
                data = {"pid": p.pid, "process": verdict.name, "signal": sig.name, "signalled": not why_not}
                if why_not:
                    self.daemon.record(
                        Event(kind=EventKind.FOREIGN_NOT_SIGNALLED, severity=Severity.WARNING, gpu=uuid, data=data,
                              message=f"{who}: not signalled: {why_not}; it is not restarted")
                    )
                else:
                    self.daemon.record(
                        Event(kind=EventKind.CHECKPOINT_REQUESTED, severity=Severity.WARNING, gpu=uuid, data=data,
                              message=f"{who}: sent {sig.name}, which it handles; it is not restarted")
                    )

    def _attach(self, job: Job) -> None:
        attach = getattr(self.daemon.backend, "attach", None)
        if attach is not None and job.pid:
            for uuid in job.gpus:
                attach(uuid, job.pid)

    def _detach(self, job: Job) -> None:
        detach = getattr(self.daemon.backend, "detach", None)
        if detach is not None and job.pid:
            for uuid in job.gpus:
                try:
                    detach(uuid, job.pid)
                except ValueError:
                    pass

    @staticmethod
    def _release(job: Job) -> None:
        """A job in a final state holds no GPU (one in backoff keeps them as its preference)."""
        if job.state in FINAL:
            job.gpus = []

    # --- views ---------------------------------------------------------
    def view(self) -> list[dict[str, Any]]:
        with self.lock:
            out = []
            for job in sorted(self.jobs.values(), key=lambda j: j.name):
                snapshots = self.ring.list(job.name)  # one directory read per job and status call
                newest = snapshots[0] if snapshots else None
                out.append(
                    {
                        "name": job.name,
                        "state": job.state.value,
                        "gpus": list(job.gpus) if job.state not in FINAL else [],
                        "attempt": job.attempt,
                        "restarts": job.restarts,
                        "pid": job.pid if job.proc is not None else None,
                        "checkpoint": job.resume_pin or (str(newest.path) if newest else None),
                        "checkpoint_path": str(job.checkpoint) if job.checkpoint else None,
                        "checkpoint_age_s": round(time.time() - newest.created, 1) if newest else None,
                        "snapshots": len(snapshots),
                        "reason": job.reason,
                        "exit_code": job.exit_code,
                        "command": job.command,
                        "workdir": str(job.workdir),
                        "user": job.user_name,
                        "source": job.source,
                        "backoff_until": job.backoff_until if job.state == JobState.BACKOFF else None,
                        "log": str(self._log_path(job)),
                    }
                )
            return out

    def jobs_on(self, uuid: str) -> list[str]:
        """The jobs holding this GPU now: a job waiting or in backoff has no process, and its
        GPUs are only a preference another job may take meanwhile."""
        idle = (JobState.WAITING, JobState.BACKOFF)
        return [j.name for j in self.jobs.values() if j.state not in FINAL and j.state not in idle and uuid in j.gpus]

    def close(self) -> None:
        """Daemon stop: the jobs keep running; only watchers and threads go."""
        self.watcher.stop()

    # --- helpers -------------------------------------------------------
    def _persist(self, job: Job) -> None:
        try:
            self.daemon.store.put_job(job.name, job.record())
        except Exception as exc:  # the job goes on; the next change tries again
            log.error("job_persist_failed", job=job.name, error=str(exc))

    def _event(self, job: Job, kind: str, severity: Severity, message: str, *, gpu: str | None = None, data: dict[str, Any] | None = None) -> None:
        self.daemon.record(Event(kind=kind, severity=severity, message=message, job=job.name, gpu=gpu, data=data or {}))

    def _index(self, uuid: str) -> int | str:
        monitor = self.daemon.monitor
        track = monitor.tracks.get(uuid) if monitor else None
        return track.info.index if track else uuid

    def _runtime(self, job: Job) -> Path:
        return self.runtime_dir / job.name

    def _log_path(self, job: Job) -> Path:
        return self.jobs_dir / job.name / "output.log"

    def _status_path(self, job: Job) -> Path:
        return self.jobs_dir / job.name / "exit-status"


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


def _ended(result: StopResult) -> str:
    code = result.returncode
    how = {"checkpoint": "after the checkpoint signal", "term": "after SIGTERM", "kill": "by SIGKILL", "already_exited": "it had exited"}
    phase = how.get(result.phase or "", "end unknown")
    return f"exit {code}, {phase}" if code is not None else phase
