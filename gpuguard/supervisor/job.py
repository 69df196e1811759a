"""A managed job: its blueprint, its current attempt (what the store keeps)
and the runtime handles that live only as long as this daemon."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpuguard.supervisor.hang import Clock
from gpuguard.supervisor.jobspec import JobSpec
from gpuguard.supervisor.process import JobProcess, StopResult
from gpuguard.supervisor.states import JobState

RECORD_VERSION = 2


@dataclass
class Attempt:
    """Where the job stands; saved on every change, so a new daemon finds it again."""

    state: JobState = JobState.STARTING
    number: int = 0  # attempts started so far
    restarts: int = 0
    crashes: int = 0  # consecutive crashes, for the backoff
    requests: int = 0  # consecutive unasked exit-75 restart requests, for their own backoff
    faults: int = 0  # consecutive fault or hang restarts of attempts that did not stay up
    restarts_by: dict[str, int] = field(default_factory=dict)  # "crash" | "fault" | "request" -> count
    gpus: list[str] = field(default_factory=list)
    pid: int | None = None
    start_time: float | None = None  # the process's create time: a reused pid is never taken for it
    started_at: float | None = None
    backoff_until: float | None = None
    reason: str | None = None
    exit_code: int | None = None
    after_stop: str | None = None  # "restart" | "stopped" | "rollback"
    resume_pin: str | None = None  # a rollback's snapshot, until a later attempt saves a newer one
    pin_attempt: int = 0  # the attempt running when the rollback was asked: its late checkpoints do not count
    pending_resets: list[str] = field(default_factory=list)  # GPUs to reset once the job is off them
    checkpoint_found: str | None = None  # where the trainer said its checkpoint is (GPUGUARD_CHECKPOINT_FILE)
    slot: int = 0  # the exit-status slot of this attempt (files.status); a promoted standby brings its own

    @classmethod
    def from_json(cls, rec: Mapping[str, Any]) -> Attempt:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in rec.items() if k in names}
        values["state"] = JobState(rec["state"])
        return cls(**values)


@dataclass
class Runtime:
    """Handles of this daemon's life only."""

    proc: JobProcess | None = None
    stopping: threading.Thread | None = None
    stop_result: StopResult | None = None
    handled: set[tuple[object, ...]] = field(default_factory=set)  # fault keys acted on in this attempt
    clock: Clock | None = None  # hang assessment's memory
    waiting_reported: bool = False
    old_pids: frozenset[int] = frozenset()  # the previous attempt's tree: its GPUs must be free of it
    release_wait_since: float | None = None  # when the restart began to wait for that
    # the warm standby (standby.py): the next attempt, started early without GPUs, waiting to be told
    standby: JobProcess | None = None
    standby_since: float | None = None
    standby_deaths: int = 0  # standbys that died waiting in a row: their replacement backs off
    standby_retry_at: float = 0.0
    standby_skipped: bool = False  # standby_skipped was said; once until a standby starts again


@dataclass
class Job:
    spec: JobSpec
    attempt: Attempt = field(default_factory=Attempt)
    rt: Runtime = field(default_factory=Runtime)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def state(self) -> JobState:
        return self.attempt.state

    @property
    def checkpoint(self) -> Path | None:
        """The checkpoint file to watch: the blueprint's, or the one the trainer named."""
        if self.spec.checkpoint is not None:
            return self.spec.checkpoint
        return Path(self.attempt.checkpoint_found) if self.attempt.checkpoint_found else None

    def record(self) -> dict[str, Any]:
        attempt = dataclasses.asdict(self.attempt)
        return {"version": RECORD_VERSION, "state": attempt["state"], "spec": self.spec.to_json(), "attempt": attempt}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Job:
        if "spec" in rec:
            return cls(JobSpec.from_json(rec["spec"]), Attempt.from_json(rec["attempt"]))
        # a record of gpuguard before version 2: one flat dict
        attempt = dict(rec) | {"number": rec.get("attempt", 0)}
        return cls(JobSpec.from_json(rec), Attempt.from_json(attempt))
