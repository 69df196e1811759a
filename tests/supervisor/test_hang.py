"""hang.assess: a pure verdict from the progress signs and the GPUs' utilisation."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from gpuguard.supervisor.hang import CPU_PROGRESS_S, Clock, Hang, Limits, Samples, assess
from gpuguard.supervisor.ports import GpuFacts

from .fakes import gpu

T0 = 1000.0
LIMITS = Limits(timeout_s=10.0, startup_timeout_s=60.0, idle_util_pct=5.0)
IDLE = [gpu("GPU-a", 0, util=0.0)]
BUSY = [gpu("GPU-a", 0, util=90.0)]
NOTHING = Samples(heartbeat_mtime=None, checkpoint_mtime=None, cpu_seconds=None)


def run(
    ticks: Sequence[tuple[float, Samples]], gpus: Sequence[GpuFacts] = IDLE, limits: Limits = LIMITS, clock: Clock | None = None
) -> tuple[Clock, list[Hang | None]]:
    """Feed (time, samples) ticks through assess; the last clock and every verdict."""
    clock = clock or Clock.start(T0)
    found: list[Hang | None] = []
    for now, samples in ticks:
        clock, hang = assess(clock, samples, gpus, limits, now)
        found.append(hang)
    return clock, found


def beat(at: float) -> Samples:
    return Samples(heartbeat_mtime=at, checkpoint_mtime=None, cpu_seconds=None)


def started_up(at: float = T0 + 1) -> Clock:
    """A clock that has seen its first heartbeat at `at`."""
    clock, _ = run([(at, beat(at))], BUSY)
    assert clock.started_up
    return clock


def test_idle_gpus_and_no_progress_past_the_limit_is_a_hang() -> None:
    clock = started_up(T0 + 1)
    _, found = run([(T0 + 5, beat(T0 + 1)), (T0 + 11.5, beat(T0 + 1))], clock=clock)
    assert found[0] is None
    assert found[1] == Hang(idle_for_s=10.5, limit_s=10.0)


def test_just_under_the_limit_is_not_a_hang() -> None:
    _, found = run([(T0 + 10.9, beat(T0 + 1))], clock=started_up(T0 + 1))
    assert found == [None]


def test_a_new_heartbeat_resets_the_clock() -> None:
    clock = started_up(T0 + 1)
    clock, found = run([(T0 + 9, beat(T0 + 9)), (T0 + 18, beat(T0 + 9)), (T0 + 19.5, beat(T0 + 9))], clock=clock)
    assert found == [None, None, Hang(10.5, 10.0)]
    assert clock.last_progress == T0 + 9


def test_the_same_heartbeat_again_is_no_progress() -> None:
    clock = started_up(T0 + 1)
    clock, _ = run([(T0 + 5, beat(T0 + 1))], clock=clock)
    assert clock.last_progress == T0 + 1


def test_a_checkpoint_write_is_progress() -> None:
    clock = started_up(T0 + 1)
    wrote = Samples(heartbeat_mtime=T0 + 1, checkpoint_mtime=T0 + 8, cpu_seconds=None)
    _, found = run([(T0 + 8, wrote), (T0 + 17, wrote)], clock=clock)
    assert found == [None, None]


def test_a_busy_gpu_is_not_a_hang() -> None:
    _, found = run([(T0 + 100, beat(T0 + 1)), (T0 + 200, beat(T0 + 1))], BUSY, clock=started_up(T0 + 1))
    assert found == [None, None]


def test_one_busy_gpu_of_several_is_enough() -> None:
    gpus = [gpu("GPU-a", 0, util=0.0), gpu("GPU-b", 1, util=80.0)]
    _, found = run([(T0 + 100, beat(T0 + 1))], gpus, clock=started_up(T0 + 1))
    assert found == [None]


def test_utilisation_at_the_idle_threshold_counts_as_idle() -> None:
    _, found = run([(T0 + 20, beat(T0 + 1))], [gpu("GPU-a", 0, util=LIMITS.idle_util_pct)], clock=started_up(T0 + 1))
    assert found[0] is not None


def test_unknown_utilisation_does_not_count_as_busy() -> None:
    """A wedged GPU that NVML cannot read never hides a hang."""
    unknown = [gpu("GPU-a", 0, util=None)]
    clock, found = run([(T0 + 20, beat(T0 + 1))], unknown, clock=started_up(T0 + 1))
    assert found == [Hang(19.0, 10.0)]
    assert clock.last_busy != T0 + 20


def test_the_start_up_limit_applies_until_the_first_heartbeat() -> None:
    _, found = run([(T0 + 30, NOTHING), (T0 + 59, NOTHING), (T0 + 61, NOTHING)])
    assert found[:2] == [None, None]
    assert found[2] == Hang(61.0, 60.0)


def test_after_the_first_heartbeat_the_short_limit_applies() -> None:
    clock, found = run([(T0 + 30, beat(T0 + 30)), (T0 + 41, beat(T0 + 30))])
    assert clock.started_up
    assert found == [None, Hang(11.0, 10.0)]


def test_a_start_up_limit_shorter_than_the_limit_never_shortens_it() -> None:
    limits = Limits(timeout_s=10.0, startup_timeout_s=2.0, idle_util_pct=5.0)
    _, found = run([(T0 + 5, NOTHING), (T0 + 10, NOTHING)], limits=limits)
    assert found == [None, Hang(10.0, 10.0)]


def test_a_heartbeat_from_before_this_attempt_does_not_count() -> None:
    """The file is left from the previous attempt: no progress, still starting up."""
    clock, found = run([(T0 + 30, beat(T0 - 5)), (T0 + 61, beat(T0 - 5))])
    assert not clock.started_up
    assert found == [None, Hang(61.0, 60.0)]


def cpu(seconds: float, heartbeat: float | None = None) -> Samples:
    return Samples(heartbeat_mtime=heartbeat, checkpoint_mtime=None, cpu_seconds=seconds)


def test_cpu_time_is_progress_before_the_first_heartbeat() -> None:
    """A job with no heartbeat that keeps using CPU (imports, data loading) is not hung."""
    ticks = [(T0 + 50.0 * i, cpu(1.0 + i)) for i in range(1, 5)]
    clock, found = run(ticks)
    assert found == [None] * 4
    assert clock.last_progress == T0 + 200


def test_too_little_cpu_time_is_no_progress() -> None:
    _, found = run([(T0 + 30, cpu(1.0)), (T0 + 61, cpu(1.0 + CPU_PROGRESS_S / 2))])
    assert found == [None, Hang(61.0, 60.0)]


def test_the_first_cpu_sample_is_only_a_baseline() -> None:
    clock, _ = run([(T0 + 30, cpu(5.0))])
    assert clock.cpu_seconds == 5.0 and clock.last_progress == T0


@pytest.mark.parametrize("reading", [1.0, 100.0])
def test_cpu_time_does_not_count_after_the_first_heartbeat(reading: float) -> None:
    """Once a job has beaten, only its heartbeat says it is alive (a spinning loop is no progress)."""
    clock, found = run([(T0 + 1, cpu(0.5, heartbeat=T0 + 1)), (T0 + 6, cpu(reading, heartbeat=T0 + 1)), (T0 + 12, cpu(reading * 2, heartbeat=T0 + 1))])
    assert clock.last_progress == T0 + 1
    assert found == [None, None, Hang(11.0, 10.0)]


def test_the_clock_carries_what_it_saw() -> None:
    clock, _ = run([(T0 + 3, Samples(heartbeat_mtime=T0 + 2, checkpoint_mtime=T0 + 3, cpu_seconds=None))], BUSY)
    assert (clock.heartbeat_mtime, clock.checkpoint_mtime) == (T0 + 2, T0 + 3)
    assert clock.last_busy == T0 + 3 and clock.started_at == T0
