"""Run calls on worker threads with a deadline the caller never blocks past.

NVML can hang for tens of seconds on a sick GPU. Each GPU gets its own lane
(one daemon thread), so a call stuck on one GPU never delays another. While a
lane is still stuck, further calls on it fail at once instead of queueing
behind the stuck one; the lane serves again as soon as the call returns.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future, wait
from typing import Any, TypeVar

T = TypeVar("T")


class DeadlineExceeded(TimeoutError):
    """A call did not finish before its deadline (or its lane is still stuck)."""

    def __init__(self, call: str, detail: str) -> None:
        super().__init__(f"{call}: {detail}")
        self.call = call
        self.detail = detail


class _Lane:
    """One daemon thread executing one call at a time."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]]] = queue.SimpleQueue()
        self.busy_since: float | None = None
        self.busy_call = ""
        self._submit_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            fut, fn = self._jobs.get()
            if not fut.set_running_or_notify_cancel():
                self.busy_since = None
                continue
            try:
                result = fn()
            except BaseException as exc:  # handed to the caller, never lost
                self.busy_since = None  # free before the caller wakes up
                fut.set_exception(exc)
            else:
                self.busy_since = None
                fut.set_result(result)

    def submit(self, call: str, fn: Callable[[], T]) -> Future[T]:
        with self._submit_lock:  # two submitters must not both see the lane free
            if self.busy_since is not None:
                stuck = time.monotonic() - self.busy_since
                raise DeadlineExceeded(call, f"lane still blocked in {self.busy_call} for {stuck:.1f}s")
            fut: Future[T] = Future()
            self.busy_since = time.monotonic()
            self.busy_call = call
            self._jobs.put((fut, fn))
            return fut


class DeadlineRunner:
    """Lanes by key (a GPU index, or "global" for calls about no one GPU)."""

    def __init__(self, name: str = "nvml") -> None:
        self._name = name
        self._lanes: dict[Hashable, _Lane] = {}
        self._lock = threading.Lock()

    def _lane(self, key: Hashable) -> _Lane:
        with self._lock:
            lane = self._lanes.get(key)
            if lane is None:
                lane = self._lanes[key] = _Lane(f"{self._name}-{key}")
            return lane

    def call(self, key: Hashable, call: str, fn: Callable[[], T], timeout_s: float) -> T:
        """fn() on key's lane; raises DeadlineExceeded after timeout_s."""
        fut = self._lane(key).submit(call, fn)
        done, _ = wait([fut], timeout=timeout_s)
        if not done:
            raise DeadlineExceeded(call, f"no answer within {timeout_s:.1f}s")
        return fut.result()  # re-raises the call's own exception, TimeoutError included

    def map(
        self, calls: Iterable[tuple[Hashable, str, Callable[[], T]]], timeout_s: float
    ) -> dict[Hashable, T | BaseException]:
        """Run one call per key in parallel under one shared deadline.

        Returns, per key, the result or the exception (DeadlineExceeded for a
        call that overran or a lane still stuck).
        """
        out: dict[Hashable, T | BaseException] = {}
        pending: dict[Future[T], tuple[Hashable, str]] = {}
        for key, call, fn in calls:
            try:
                pending[self._lane(key).submit(call, fn)] = (key, call)
            except DeadlineExceeded as exc:
                out[key] = exc
        done, not_done = wait(pending, timeout=timeout_s)
        for fut in done:
            key, _ = pending[fut]
            exc = fut.exception()
            out[key] = exc if exc is not None else fut.result()
        for fut in not_done:
            key, call = pending[fut]
            out[key] = DeadlineExceeded(call, f"no answer within {timeout_s:.1f}s")
        return out
