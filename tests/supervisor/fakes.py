"""Fakes of the supervisor's ports (ports.py) and a small harness that builds a
Supervisor on them: no daemon, no NVML, only real job processes."""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from harness import wait_until
from gpuguard.events import Event
from gpuguard.health.types import Action, GpuState
from gpuguard.supervisor import pids
from gpuguard.supervisor.files import JobFiles
from gpuguard.supervisor.job import Job
from gpuguard.supervisor.ports import Facts, GpuFacts, Ports, Settings
from gpuguard.supervisor.snapshots import SnapshotRing
from gpuguard.supervisor.states import IllegalTransition, JobEvent, JobState, transition
from gpuguard.supervisor.supervisor import Supervisor

GPU0, GPU1 = "GPU-0000", "GPU-1111"

FAST = Settings(
    checkpoint_signal="SIGUSR1",
    checkpoint_grace_s=1.0,
    stop_timeout_s=1.0,
    max_restarts=3,
    backoff_initial_s=0.05,
    backoff_max_s=0.1,
    stable_after_s=60.0,
    migrate_on_degraded=True,
    foreign_never_signal=(),
    hang_timeout_s=0.5,
    hang_startup_timeout_s=0.5,
    hang_idle_util_pct=5.0,
)


def gpu(uuid: str, index: int, state: GpuState = GpuState.HEALTHY, *, util: float | None = 50.0, **kw: Any) -> GpuFacts:
    """One GPU's facts; health follows state unless given."""
    kw.setdefault("health", state)
    return GpuFacts(uuid, state, kw.pop("action", Action.NONE), kw.pop("reason", None), index=index, util_pct=util, **kw)


def two_gpus(util: float | None = 50.0) -> dict[str, GpuFacts]:
    """GPU 0 and GPU 1, both healthy and busy (or at `util`)."""
    return {GPU0: gpu(GPU0, 0, util=util), GPU1: gpu(GPU1, 1, util=util)}


def faulted(facts: Mapping[str, GpuFacts], uuid: str, action: Action = Action.RESET_GPU) -> dict[str, GpuFacts]:
    """The same facts with one GPU faulted (health and effective state)."""
    bad = replace(facts[uuid], state=GpuState.FAULTED, health=GpuState.FAULTED, action=action, reason="Xid 48: double-bit ECC")
    return dict(facts) | {uuid: bad}


class FakePool:
    """Records every call the supervisor makes on the GPU pool."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def exclude(self, uuid: str, reason: str) -> None:
        self.calls.append(("exclude", uuid, reason))

    def reset_when_free(self, uuid: str, by: str) -> None:
        self.calls.append(("reset_when_free", uuid, by))

    def node_unhealthy(self, reason: str) -> None:
        self.calls.append(("node_unhealthy", reason))

    def job_hung(self, job: str, uuids: Sequence[str]) -> None:
        self.calls.append(("job_hung", (job, tuple(uuids))))

    def refresh(self) -> None:
        self.calls.append(("refresh", ()))

    def occupied(self, uuid: str, pid: int) -> None:
        self.calls.append(("occupied", uuid, pid))

    def vacated(self, uuid: str, pid: int) -> None:
        self.calls.append(("vacated", uuid, pid))

    def called(self, name: str) -> list[tuple[Any, ...]]:
        """The arguments of every call of `name`, in order."""
        return [c[1:] for c in list(self.calls) if c[0] == name]


class FakeRecords:
    """Job records by name, stored as JSON would store them; `full` makes writes fail."""

    def __init__(self) -> None:
        self.saved: dict[str, dict[str, Any]] = {}
        self.full = False

    def jobs(self) -> list[dict[str, Any]]:
        return [json.loads(json.dumps(r)) for r in self.saved.values()]

    def put_job(self, name: str, record: dict[str, Any]) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.saved[name] = json.loads(json.dumps(record))


class EventLog:
    """The `record` port: keeps every event, returns it as the store would."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> Event:
        self.events.append(event)
        return event

    def kinds(self, job: str | None = None) -> list[str]:
        return [e.kind for e in list(self.events) if job is None or e.job == job]

    def of(self, kind: str) -> list[Event]:
        return [e for e in list(self.events) if e.kind == kind]


@dataclass
class Node:
    """Everything outside the supervisor: the fakes, the current facts, the dirs."""

    root: Path
    pool: FakePool = field(default_factory=FakePool)
    records: FakeRecords = field(default_factory=FakeRecords)
    log: EventLog = field(default_factory=EventLog)
    facts: Facts = field(default_factory=two_gpus)
    settings: Settings = FAST
    wakes: int = 0
    supervisors: list[Supervisor] = field(default_factory=list)

    def wake(self) -> None:
        self.wakes += 1

    def release(self) -> None:
        """At teardown, before the processes are ended: let go of anything a test holds shut."""

    def ports(self) -> Ports:
        return Ports(
            pool=self.pool,
            record=self.log,
            records=self.records,
            wake=self.wake,
            settings=lambda: self.settings,
            facts=lambda: self.facts,
        )

    def supervisor(self) -> Supervisor:
        """A new Supervisor over this node's records and dirs, started with no config jobs."""
        files = JobFiles(self.root / "jobs", self.root / "run" / "jobs")
        ring = SnapshotRing(self.root / "snapshots", keep_newest=3, max_bytes=10**9)
        sup = Supervisor(self.ports(), files, ring)
        self.supervisors.append(sup)
        sup.start([], self.facts)
        return sup

    def submit(self, sup: Supervisor, name: str, code: str, **req: Any) -> Job:
        """Run `python -c code` as the current user from a workdir under the test's tmp dir."""
        workdir = self.root / "work"
        workdir.mkdir(exist_ok=True)
        request = {"name": name, "command": [sys.executable, "-c", code], "workdir": str(workdir)} | req
        return sup.submit(request, os.getuid(), os.getgid(), tuple(os.getgroups()))

    def tick_until(self, sup: Supervisor, done: Callable[[], object], what: str, timeout_s: float = 10.0) -> None:
        """Tick with the current facts until `done()` holds; fail after timeout_s."""

        def ticked() -> object:
            sup.tick(time.time(), self.facts)
            return done()

        wait_until(ticked, timeout_s, what, interval=0.02, detail=lambda: f"events: {self.log.kinds()}")


class MoveLog:
    """Stands in for `transition` in runner.py: every move, and the illegal ones."""

    def __init__(self) -> None:
        self.moves: list[tuple[JobState, JobEvent, JobState]] = []
        self.illegal: list[tuple[JobState, JobEvent]] = []

    def __call__(self, state: JobState, event: JobEvent) -> JobState:
        try:
            after = transition(state, event)
        except IllegalTransition:
            self.illegal.append((state, event))
            raise
        self.moves.append((state, event, after))
        return after


class SpyLog:
    """The supervisor's logger, keeping what `tick` swallows with log.exception."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.exceptions: list[str] = []

    def exception(self, event: str, **kw: Any) -> None:
        self.exceptions.append(f"{event} {kw}\n{traceback.format_exc()}")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def kill_started(me: psutil.Process, before: set[int]) -> None:
    """SIGKILL every descendant not there before; reap our children, wait until the rest are gone."""
    started = [p for p in me.children(recursive=True) if p.pid not in before]
    for p in reversed(started):  # the jobs before their wrappers
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    ours = [p for p in started if p.pid in {c.pid for c in me.children()}]
    psutil.wait_procs(ours, timeout=5)
    deadline = time.monotonic() + 5
    for p in started:
        while time.monotonic() < deadline:
            try:
                if p.status() == psutil.STATUS_ZOMBIE:  # dead; its new parent reaps it
                    break
            except psutil.Error:
                break
            time.sleep(0.01)


def tree_of(job: Job) -> dict[int, float]:
    """pid -> create_time of the job's running tree (the wrapper and the job)."""
    assert job.rt.proc is not None
    return {p.pid: p.create_time() for p in job.rt.proc.tree()}


def gone(tree: dict[int, float]) -> bool:
    """None of these processes runs any more (a zombie or a reused pid is not one of them)."""
    return not any(_running(pid, ct) for pid, ct in tree.items())


def _running(pid: int, created: float) -> bool:
    try:
        return pids.same_process(pid, created) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_for(done: Callable[[], object], what: str, timeout_s: float = 10.0) -> None:
    """Poll `done()` until it holds; fail after timeout_s (harness.wait_until, in these tests' argument order)."""
    wait_until(done, timeout_s, what, interval=0.02)
