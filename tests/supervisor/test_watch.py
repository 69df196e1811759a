"""The checkpoint watcher on real files and real inotify, with a short settle time."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuguard.supervisor.watch import CheckpointWatcher

SETTLE = 0.2


class Calls:
    """Records on_complete calls; lets a test wait for them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Path, int]] = []
        self._cond = threading.Condition()

    def __call__(self, job: str, path: Path) -> None:
        with self._cond:
            self.calls.append((job, path, path.stat().st_size))
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 3.0) -> list[tuple[str, Path, int]]:
        with self._cond:
            self._cond.wait_for(lambda: len(self.calls) >= count, timeout)
            return list(self.calls)


def caught_up(watcher: CheckpointWatcher, directory: Path) -> None:
    """Wait until the watcher has settled every write made in `directory` so far. A marker
    written there now, and left open, settles on the full settle time, so no earlier write
    there settles after it; reports come in order on one thread: once the marker's is in,
    any report of an earlier write is in too. A negative assert after this is about the
    watcher, not about a sleep."""
    marker = directory / ".caught-up"
    seen = Calls()
    watcher.watch("caught-up", marker, seen)
    try:
        with marker.open("wb") as f:
            f.write(b"m")
            f.flush()
            assert seen.wait_for(1, timeout=SETTLE * 20), "the watcher never reported the marker"
    finally:
        watcher.unwatch("caught-up")


@pytest.fixture
def watcher() -> Iterator[CheckpointWatcher]:
    w = CheckpointWatcher(settle_s=SETTLE)
    yield w
    w.stop()


def write_in_chunks(path: Path, chunks: int = 6, pause: float = 0.05) -> int:
    """Like a trainer's write_bytes of a big buffer: truncate, then write piece by piece."""
    with path.open("wb") as f:
        for _ in range(chunks):
            f.write(b"x" * 4096)
            f.flush()
            time.sleep(pause)
    return chunks * 4096


def test_chunked_write_reported_once_after_settling(tmp_path: Path) -> None:
    # a long settle time, so that "reported before it" is a bound a loaded machine keeps
    slow = 2.0
    watcher = CheckpointWatcher(settle_s=slow)
    try:
        path = tmp_path / "last.pt"
        calls = Calls()
        watcher.watch("yolo", path, calls)
        size = write_in_chunks(path)  # ~0.3 s of writing, each pause shorter than the settle time
        written = time.monotonic()
        assert calls.wait_for(1, timeout=slow * 3) == [("yolo", path, size)]
        # the close after writing says the write is over: no need to wait the settle time
        assert time.monotonic() - written < slow
        time.sleep(slow * 1.5)  # past the settle time of that write
        path.write_bytes(b"z" * 10)  # a later write: the watcher is still looking, and said nothing in between
        assert calls.wait_for(2, timeout=slow * 3) == [("yolo", path, size), ("yolo", path, 10)]
    finally:
        watcher.stop()


def test_write_left_open_is_reported_only_after_settling(tmp_path: Path, watcher: CheckpointWatcher) -> None:
    path = tmp_path / "last.pt"
    calls = Calls()
    watcher.watch("yolo", path, calls)
    with path.open("wb") as f:
        f.write(b"x" * 4096)
        f.flush()
        written = time.monotonic()
        assert calls.wait_for(1, timeout=SETTLE * 3)
        assert time.monotonic() - written >= SETTLE * 0.9  # no close yet: only the settle time tells

    # written again in place (Ultralytics' write_bytes): one more call
    path.write_bytes(b"y" * 100)
    assert calls.wait_for(2)[1] == ("yolo", path, 100)


def test_atomic_replace_reported_once(tmp_path: Path, watcher: CheckpointWatcher) -> None:
    path = tmp_path / "last.pt"
    path.write_bytes(b"old")
    calls = Calls()
    watcher.watch("yolo", path, calls)
    tmp = tmp_path / "last.pt.tmp"
    write_in_chunks(tmp, chunks=3, pause=0.02)
    os.replace(tmp, path)
    assert calls.wait_for(1) == [("yolo", path, 3 * 4096)]
    caught_up(watcher, tmp_path)
    assert len(calls.calls) == 1


def test_directory_created_later(tmp_path: Path, watcher: CheckpointWatcher) -> None:
    path = tmp_path / "runs" / "detect" / "train" / "weights" / "last.pt"
    calls = Calls()
    watcher.watch("yolo", path, calls)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"z" * 10)
    assert calls.wait_for(1) == [("yolo", path, 10)]

    # the run directory removed and made again (a new run): still followed
    (path).unlink()
    for d in (path.parent, path.parent.parent):
        d.rmdir()
    time.sleep(0.05)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"w" * 20)
    assert calls.wait_for(2)[1] == ("yolo", path, 20)


def test_jobs_in_one_directory_and_unwatch(tmp_path: Path, watcher: CheckpointWatcher) -> None:
    a, b = Calls(), Calls()
    watcher.watch("a", tmp_path / "a.pt", a)
    watcher.watch("b", tmp_path / "b.pt", b)
    watcher.unwatch("b")
    (tmp_path / "b.pt").write_bytes(b"b")
    (tmp_path / "a.pt").write_bytes(b"a")
    assert a.wait_for(1) == [("a", tmp_path / "a.pt", 1)]
    assert b.calls == []  # b's write was before a's, so it would have been reported by now


def test_failing_callback_does_not_stop_the_watcher(tmp_path: Path, watcher: CheckpointWatcher) -> None:
    calls = Calls()

    def broken(job: str, path: Path) -> None:
        calls(job, path)
        raise RuntimeError("callback bug")

    watcher.watch("yolo", tmp_path / "last.pt", broken)
    (tmp_path / "last.pt").write_bytes(b"1")
    calls.wait_for(1)
    (tmp_path / "last.pt").write_bytes(b"22")
    assert [c[2] for c in calls.wait_for(2)] == [1, 2]


def test_stopped_watcher_refuses_new_watches(tmp_path: Path) -> None:
    w = CheckpointWatcher(settle_s=SETTLE)
    w.stop()
    w.stop()  # idempotent
    with pytest.raises(RuntimeError, match="stopped"):
        w.watch("yolo", tmp_path / "last.pt", Calls())
