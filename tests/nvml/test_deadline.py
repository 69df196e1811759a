"""DeadlineRunner: per-key lanes, a deadline the caller never blocks past."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from gpuguard.nvml.deadline import DeadlineExceeded, DeadlineRunner

TIMEOUT_S = 0.2
MARGIN_S = 2.0  # a deadline kept on a loaded 2-core machine
LONG_S = 10.0  # a call that answers well within this did not wait for its deadline


@pytest.fixture
def release() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()  # never leave a lane stuck behind a test


def test_call_returns_the_result() -> None:
    runner = DeadlineRunner("t")
    assert runner.call(0, "add", lambda: 1 + 1, TIMEOUT_S) == 2


def test_call_raises_what_the_call_raised() -> None:
    runner = DeadlineRunner("t")

    def boom() -> None:
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        runner.call(0, "boom", boom, TIMEOUT_S)
    assert runner.call(0, "again", lambda: "ok", TIMEOUT_S) == "ok"  # the lane is free again


def test_overrun_raises_at_the_deadline_and_the_lane_fails_fast(release: threading.Event) -> None:
    runner = DeadlineRunner("t")
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded) as info:
        runner.call(0, "nvmlDeviceGetTemperature", release.wait, TIMEOUT_S)
    assert TIMEOUT_S <= time.monotonic() - start < TIMEOUT_S + MARGIN_S
    assert info.value.call == "nvmlDeviceGetTemperature"
    assert "no answer within 0.2s" in info.value.detail

    start = time.monotonic()
    with pytest.raises(DeadlineExceeded) as info:
        runner.call(0, "nvmlDeviceGetPowerUsage", lambda: 1, LONG_S)
    assert time.monotonic() - start < LONG_S / 2
    assert "still blocked in nvmlDeviceGetTemperature" in info.value.detail

    assert runner.call(1, "other lane", lambda: "free", TIMEOUT_S) == "free"

    release.set()
    deadline = time.monotonic() + 2.0
    while True:  # the lane serves again once the stuck call returns
        try:
            assert runner.call(0, "after", lambda: "back", TIMEOUT_S) == "back"
            break
        except DeadlineExceeded:
            assert time.monotonic() < deadline
            time.sleep(0.01)


def test_map_shares_one_deadline(release: threading.Event) -> None:
    runner = DeadlineRunner("t")

    together = threading.Barrier(2)

    def slow(value: int) -> int:
        together.wait(timeout=LONG_S)  # both lanes in flight at once, or neither returns
        return value

    def fail() -> int:
        raise KeyError("x")

    start = time.monotonic()
    out = runner.map(
        [
            (0, "slow 0", lambda: slow(0)),
            (1, "slow 1", lambda: slow(1)),
            (2, "hung", release.wait),
            (3, "fail", fail),
        ],
        1.0,
    )
    assert 1.0 <= time.monotonic() - start < 1.0 + MARGIN_S
    assert out[0] == 0 and out[1] == 1  # the barrier let them through: the lanes ran in parallel
    assert isinstance(out[2], DeadlineExceeded) and out[2].call == "hung"
    assert isinstance(out[3], KeyError)

    start = time.monotonic()
    again = runner.map([(0, "zero", lambda: 0), (2, "hung again", lambda: 2)], LONG_S)
    assert time.monotonic() - start < LONG_S / 2  # the stuck lane does not hold up the rest
    assert again[0] == 0
    assert isinstance(again[2], DeadlineExceeded) and "still blocked in hung" in again[2].detail


def test_map_of_nothing() -> None:
    assert DeadlineRunner("t").map([], TIMEOUT_S) == {}


def test_lanes_are_daemon_threads_named_by_key() -> None:
    runner = DeadlineRunner("nvml")
    name = runner.call("global", "name", lambda: threading.current_thread().name, TIMEOUT_S)
    assert name == "nvml-global"
    assert runner.call("global", "daemon", lambda: threading.current_thread().daemon, TIMEOUT_S)


def test_call_reraises_a_timeout_error_raised_by_the_call() -> None:
    runner = DeadlineRunner("t")

    def times_out() -> None:
        raise TimeoutError("the call's own timeout")

    with pytest.raises(TimeoutError, match="the call's own timeout"):
        runner.call(0, "own", times_out, TIMEOUT_S)
