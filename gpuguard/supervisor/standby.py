"""A warm standby: the next attempt of a job, started early while the current one trains.

Most of a restart is the trainer's own start-up (imports, model, dataset
index: docs/BENCHMARKS.md). A job with `standby` keeps its next attempt
started ahead of time: spawned like an attempt (the root wrapper, the job's
user, environment and log) but with `GPUGUARD_STANDBY=1`,
`CUDA_VISIBLE_DEVICES=""` and no `GPUGUARD_ATTEMPT`, in the other exit-status
slot (files.status), hence with its own wrapper, session and cgroup: the stop
of the running attempt (SIGTERM to its tree, cgroup.kill) never reaches it.
It builds what needs no GPU and waits in `gpuguard.job.wait_until_started()`.

When the next attempt starts (try_start, after the record is saved and the
GPUs are released), `promote` writes the hand-over file and the standby
becomes the attempt's process. The standby is never on a GPU before that: it
is in no `occupied` call, so the pool never counts it as a holder, and hang
detection never sees it. One that dies is replaced with back-off; none starts
while the node's available memory is below `[jobs] standby_min_free_mb`, and a
waiting one is ended when it falls below half of that (the training's memory
comes first); a
job that ends ends its standby; a daemon restart ends one found from before
(Supervisor._end_strays looks in both slots) instead of adopting it.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from gpuguard import contract
from gpuguard.events import EventKind
from gpuguard.health.types import Severity
from gpuguard.job import HANDED_OVER
from gpuguard.supervisor.files import job_env, remove, write_for_job
from gpuguard.supervisor.job import Job
from gpuguard.supervisor.policy import backoff_s
from gpuguard.supervisor.process import JobProcess, UserSpec, spawn
from gpuguard.supervisor.states import JobState

if TYPE_CHECKING:
    from gpuguard.supervisor.runner import JobRunner

# An attempt that shows no progress (no heartbeat, no checkpoint) gets this long to start
# up before a standby competes with it for the CPU ([jobs] standby_delay_s after progress).
NO_PROGRESS_S = 30.0
STOP_TERM_S = 2.0  # SIGTERM to SIGKILL for a standby no longer wanted: it only waits
WAITING = "waiting"


def available_mb() -> float:
    """The node's available memory (psutil: free plus reclaimable)."""
    return psutil.virtual_memory().available / 2**20


class Standbys:
    """Each job's standby: started, watched, promoted, ended. Part of the JobRunner,
    called under the supervisor's lock (the tick, try_start, move)."""

    def __init__(self, runner: JobRunner) -> None:
        self.runner = runner
        self._progress: dict[str, tuple[float, float]] = {}  # job -> (its attempt's start, first progress seen)

    def tick(self, job: Job, now: float) -> None:
        """Notice a standby that died (its replacement backs off), end one the node's memory can no
        longer spare, start one when due."""
        rt = job.rt
        if rt.standby is not None and not rt.standby.alive():
            self._died(job, rt.standby, now)
        self._spare(job)
        if rt.standby is None and self._due(job, now):
            self._start(job, now)

    def _spare(self, job: Job) -> None:
        """A waiting standby holds memory the training may need at its peak, and the kernel's OOM killer
        picks by size: usually the training. Below half of `standby_min_free_mb` available it is ended;
        none starts again until `standby_min_free_mb` is available (the gap keeps it from flapping)."""
        proc, min_free = job.rt.standby, self.runner.settings.standby_min_free_mb
        if proc is None:
            return
        free = available_mb()
        if free >= min_free / 2:
            return
        self.end(job)
        job.rt.standby_skipped = True  # the start path says nothing more until one starts
        self.runner.say(
            job, EventKind.STANDBY_SKIPPED, Severity.WARNING,
            f"job {job.name}: warm standby (pid {proc.pid}) ended: {free:.0f} MB available, under half of "
            f"[jobs] standby_min_free_mb ({min_free}); another once that much is available",
            data={"available_mb": round(free), "min_free_mb": min_free, "ended_pid": proc.pid},
        )  # fmt: skip

    def _due(self, job: Job, now: float) -> bool:
        rt = job.rt
        if not job.spec.standby or job.state != JobState.RUNNING or rt.proc is None or rt.stopping is not None:
            return False
        if now < rt.standby_retry_at or rt.clock is None:
            return False
        if not rt.clock.started_up:
            return now - rt.clock.started_at >= NO_PROGRESS_S
        seen = self._progress.get(job.name)
        if seen is None or seen[0] != rt.clock.started_at:  # this attempt's first progress
            seen = self._progress[job.name] = (rt.clock.started_at, now)
        return now - seen[1] >= self.runner.settings.standby_delay_s

    def _start(self, job: Job, now: float) -> None:
        runner, rt = self.runner, job.rt
        settings = runner.settings
        free = available_mb()
        if free < settings.standby_min_free_mb:
            if not rt.standby_skipped:
                rt.standby_skipped = True
                runner.say(
                    job, EventKind.STANDBY_SKIPPED, Severity.WARNING,
                    f"job {job.name}: no warm standby: {free:.0f} MB available, below [jobs] standby_min_free_mb "
                    f"({settings.standby_min_free_mb}); looked at again each tick",
                    data={"available_mb": round(free), "min_free_mb": settings.standby_min_free_mb},
                )
            return
        slot = 1 - job.attempt.slot
        handover = runner.files.handover(job.name, slot)
        env = job_env(job, runner.files, settings.checkpoint_signal, None) | {
            contract.CUDA_VISIBLE_DEVICES: "",
            contract.ENV_STANDBY: "1",
            contract.ENV_STANDBY_FILE: str(handover),
            # torch.cuda.is_available() (Ultralytics asks it while building) would otherwise call
            # cudaGetDeviceCount, which starts the driver with no GPU visible for good; through
            # NVML it only counts (not yet checked on a real GPU: no device in this session)
            "PYTORCH_NVML_BASED_CUDA_CHECK": "1",
        }
        env.pop(contract.ENV_ATTEMPT, None)  # only the hand-over says which attempt it is
        try:
            remove(handover)
            proc = spawn(
                list(job.spec.command), env=env, cwd=job.spec.workdir, user=job.spec.user,
                log_path=runner.files.log(job.name), status_path=runner.files.status(job.name, slot), job_name=job.name,
            )
        except (OSError, ValueError) as exc:
            self._back_off(job, now, f"it could not start: {exc}")
            return
        rt.standby, rt.standby_since, rt.standby_skipped = proc, now, False
        runner.say(
            job, EventKind.STANDBY_STARTED, Severity.INFO,
            f"job {job.name}: warm standby started (pid {proc.pid}); it waits without GPUs to become the next attempt",
            data={"pid": proc.pid},
        )

    def _died(self, job: Job, proc: JobProcess, now: float) -> None:
        code = proc.exit_status()
        proc.end_leftovers(STOP_TERM_S)  # what it forked goes with it
        job.rt.standby = None
        if now - (job.rt.standby_since or now) >= self.runner.settings.stable_after_s:
            job.rt.standby_deaths = 0
        what = "exit status unknown" if code is None else (f"killed by signal {-code}" if code < 0 else f"exit {code}")
        self._back_off(job, now, what)

    def _back_off(self, job: Job, now: float, what: str) -> None:
        rt, settings = job.rt, self.runner.settings
        rt.standby_deaths += 1
        delay = backoff_s(rt.standby_deaths, settings.backoff_initial_s, settings.backoff_max_s)
        rt.standby_retry_at = now + delay
        self.runner.say(
            job, EventKind.STANDBY_DIED, Severity.WARNING,
            f"job {job.name}: its warm standby ended while it waited ({what}); another in {delay:g}s",
            data={"backoff_s": delay},
        )

    def promote(self, job: Job, env: dict[str, str]) -> JobProcess | None:
        """Hand the next attempt's GPUs and resume path (from env) to the waiting standby;
        its process, or None when there is none to promote (the caller spawns instead).
        The caller has saved the attempt's record already."""
        proc = job.rt.standby
        if proc is None:
            return None
        if not proc.alive():
            self._died(job, proc, time.time())
            return None
        slot = 1 - job.attempt.slot
        told = {key: env[key] for key in HANDED_OVER if key in env}
        try:
            write_handover(self.runner.files.handover(job.name, slot), told, job.spec.user)
        except OSError as exc:
            self.runner.say(job, EventKind.STANDBY_DIED, Severity.WARNING, f"job {job.name}: its warm standby could not be told to start ({exc}); a new attempt is spawned")
            self.end(job)
            return None
        job.rt.standby, job.rt.standby_deaths = None, 0
        job.attempt.slot = slot
        gpus = told[contract.CUDA_VISIBLE_DEVICES]
        self.runner.say(
            job, EventKind.STANDBY_PROMOTED, Severity.INFO,
            f"job {job.name}: warm standby (pid {proc.pid}) handed GPUs {gpus} as attempt {told[contract.ENV_ATTEMPT]}",
            data={"pid": proc.pid, "attempt": int(told[contract.ENV_ATTEMPT])},
        )
        return proc

    def end(self, job: Job) -> None:
        """The job no longer wants a standby (it ended, or left for Slurm): stop it on a
        worker, off the tick (SIGTERM, then SIGKILL after STOP_TERM_S)."""
        proc, job.rt.standby = job.rt.standby, None
        if proc is not None:
            proc.signal_tree(signal.SIGTERM)  # now, so that it goes even when the daemon exits next
            threading.Thread(target=proc.stop, args=(None, 0.0, STOP_TERM_S), name=f"standby-stop-{job.name}", daemon=True).start()

    @staticmethod
    def view(job: Job) -> dict[str, Any] | None:
        proc = job.rt.standby
        return {"pid": proc.pid, "state": WAITING, "since": job.rt.standby_since} if proc is not None else None


def write_handover(path: Path, told: dict[str, str], user: UserSpec | None) -> None:
    """The hand-over, written as files.write_for_job writes (the job cannot plant anything there)."""
    write_for_job(path, json.dumps(told).encode(), user)
