"""Is a job hung? A pure assessment of its progress signs and its GPUs.

A hang: every GPU of the job idle (or its utilisation unknown) while the job
shows no progress (no new heartbeat, no new checkpoint write, and, before
its first heartbeat, no CPU time spent) for the hang limit. A trainer that
is still starting up (imports, data, CUDA init) gets the longer start-up
limit until its first heartbeat or checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from gpuguard.supervisor.ports import GpuFacts

CPU_PROGRESS_S = 0.05  # CPU seconds per tick that count as progress for jobs without a heartbeat


@dataclass(frozen=True, slots=True)
class Samples:
    """What was read of the job this tick (None: not there, or not read)."""

    heartbeat_mtime: float | None
    checkpoint_mtime: float | None
    cpu_seconds: float | None  # the tree's CPU time; read only until the first heartbeat


@dataclass(frozen=True, slots=True)
class Clock:
    """The progress memory of one attempt, carried from tick to tick."""

    started_at: float
    last_progress: float
    last_busy: float
    heartbeat_mtime: float | None = None
    checkpoint_mtime: float | None = None
    cpu_seconds: float | None = None

    @classmethod
    def start(cls, now: float) -> Clock:
        return cls(now, now, now)

    @property
    def started_up(self) -> bool:
        """A heartbeat or checkpoint of this attempt was seen."""
        return self.heartbeat_mtime is not None or self.checkpoint_mtime is not None


@dataclass(frozen=True, slots=True)
class Limits:
    timeout_s: float
    startup_timeout_s: float
    idle_util_pct: float


@dataclass(frozen=True, slots=True)
class Hang:
    idle_for_s: float
    limit_s: float


def assess(clock: Clock, samples: Samples, gpus: Sequence[GpuFacts], limits: Limits, now: float) -> tuple[Clock, Hang | None]:
    """The clock after this tick, and a Hang when the job has been idle past its limit."""
    progress = False
    heartbeat, checkpoint, cpu = clock.heartbeat_mtime, clock.checkpoint_mtime, clock.cpu_seconds
    # only this attempt's heartbeats and checkpoint writes count
    if samples.heartbeat_mtime is not None and samples.heartbeat_mtime > clock.started_at and samples.heartbeat_mtime != heartbeat:
        progress, heartbeat = True, samples.heartbeat_mtime
    if samples.checkpoint_mtime is not None and samples.checkpoint_mtime > clock.started_at and samples.checkpoint_mtime != checkpoint:
        progress, checkpoint = True, samples.checkpoint_mtime
    if heartbeat is None and samples.cpu_seconds is not None:  # no heartbeat yet: CPU time is the best sign of life
        if cpu is not None and samples.cpu_seconds - cpu >= CPU_PROGRESS_S:
            progress = True
        cpu = samples.cpu_seconds
    # an idle GPU is one that says so: unknown utilisation never proves a hang, never hides one either
    busy = any(g.util_pct is not None and g.util_pct > limits.idle_util_pct for g in gpus)
    clock = replace(
        clock,
        last_progress=now if progress else clock.last_progress,
        last_busy=now if busy else clock.last_busy,
        heartbeat_mtime=heartbeat,
        checkpoint_mtime=checkpoint,
        cpu_seconds=cpu,
    )
    idle_for = now - max(clock.last_progress, clock.last_busy, clock.started_at)
    limit = limits.timeout_s if clock.started_up else max(limits.timeout_s, limits.startup_timeout_s)
    return clock, (Hang(idle_for, limit) if idle_for >= limit else None)
