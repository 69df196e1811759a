"""Notice when a job has finished writing its checkpoint file.

A trainer rewrites `last.pt` in place (Ultralytics' `write_bytes`), or
replaces it by rename, or creates it in a run directory that does not exist
yet. inotify (through watchdog) says *that* the file is being written; a
close after writing or a rename into place says the write is over (checked
after DONE_SETTLE_S), and other writes count as complete once the file has
stayed unchanged (inode, size, mtime) for a settle time after the last event.
The callback only says "look now"; validating and snapshotting is the
caller's job, since the file may still be torn.

All state lives on one worker thread: watchdog's dispatcher only queues
events, and watch()/unwatch() hand their work to the worker and wait, so no
lock is ever held across a call into watchdog (whose dispatcher calls our
handler under its own lock). The callbacks (a copy of a large checkpoint)
run on a thread of their own, `checkpoint-snapshot`, so a watch() from the
supervisor's tick never waits for one; a file reported again while its
report is still queued is reported once.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch

log = structlog.get_logger(__name__)

OnComplete = Callable[[str, Path], None]
# events that mean the file's content may have changed; opened/closed-no-write
# (our own validation reading the file) and attrib are not among them
_WRITE_EVENTS = frozenset({"created", "modified", "closed", "moved"})
_DIR_EVENTS = frozenset({"created", "moved", "deleted"})
# the writer closed the file or renamed it into place: the write is over
_DONE_EVENTS = frozenset({"closed", "moved"})
DONE_SETTLE_S = 0.05  # coalesces a close with the events right behind it
_STOP = object()


@dataclass
class _Job:
    path: str  # absolute, not resolved: watchdog reports paths under the watched one as given
    on_complete: OnComplete
    watched_dir: str | None = None  # the directory watched for it: the file's, or an ancestor
    due: float | None = None  # monotonic time of the next settle check; None when idle
    seen: tuple[int, int, int] | None = None  # (inode, size, mtime_ns) at the last look


@dataclass
class _Command:
    run: Callable[[], None]
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class _Forward(FileSystemEventHandler):
    """Runs on watchdog's dispatcher thread: hand the event over, nothing else."""

    def __init__(self, inbox: queue.SimpleQueue[Any]) -> None:
        self._inbox = inbox

    def on_any_event(self, event: FileSystemEvent) -> None:
        self._inbox.put(event)


class CheckpointWatcher:
    """Calls `on_complete(job, path)` once per finished write of each watched file."""

    def __init__(self, *, settle_s: float = 0.5, observer: BaseObserver | None = None) -> None:
        self.settle_s = settle_s
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._handler = _Forward(self._inbox)
        self._observer = observer or Observer()
        self._jobs: dict[str, _Job] = {}
        self._dirs: dict[str, tuple[ObservedWatch, int]] = {}  # watched dir -> (watch, users)
        self._reports: queue.SimpleQueue[Any] = queue.SimpleQueue()  # (job, callback, path) or _STOP
        self._queued: set[str] = set()  # jobs with a report waiting on the callback thread
        self._queued_lock = threading.Lock()
        self._observer.start()
        self._thread = threading.Thread(target=self._loop, name="checkpoint-watcher", daemon=True)
        self._thread.start()
        self._reporter = threading.Thread(target=self._report_loop, name="checkpoint-snapshot", daemon=True)
        self._reporter.start()

    # ---- public: each runs on the worker thread and waits for it ------------------

    def watch(self, job: str, path: Path, on_complete: OnComplete) -> None:
        """Start (or restart) watching `job`'s checkpoint; its directory may not exist yet.

        A file that already exists is not reported; only writes from now on.
        """
        self._call(lambda: self._watch(job, os.path.abspath(path), on_complete))

    def unwatch(self, job: str) -> None:
        self._call(lambda: self._unwatch(job))

    def stop(self) -> None:
        """Stop watching everything; pending writes and queued reports are dropped,
        a callback under way ends first."""
        if self._thread.is_alive():
            self._inbox.put(_STOP)
            self._thread.join()
        if self._reporter.is_alive():
            with contextlib.suppress(queue.Empty):
                while True:
                    self._reports.get_nowait()
            self._reports.put(_STOP)
            if threading.current_thread() is not self._reporter:
                self._reporter.join()
        if self._observer.is_alive():
            self._observer.stop()
            self._observer.join()

    def _call(self, run: Callable[[], None]) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("checkpoint watcher is stopped")
        command = _Command(run)
        self._inbox.put(command)
        command.done.wait()
        if command.error is not None:
            raise command.error

    # ---- the worker ---------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            dues = [j.due for j in self._jobs.values() if j.due is not None]
            timeout = max(0.0, min(dues) - time.monotonic()) if dues else None
            try:
                item = self._inbox.get(timeout=timeout)
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            if isinstance(item, _Command):
                try:
                    item.run()
                except BaseException as exc:  # handed back to the caller, who raises it
                    item.error = exc
                item.done.set()
            elif isinstance(item, FileSystemEvent):
                self._on_event(item)
            self._settle()

    def _watch(self, job: str, path: str, on_complete: OnComplete) -> None:
        self._unwatch(job)
        self._jobs[job] = _Job(path, on_complete)
        self._follow(self._jobs[job])

    def _unwatch(self, job: str) -> None:
        entry = self._jobs.pop(job, None)
        if entry is not None and entry.watched_dir is not None:
            self._release(entry.watched_dir)

    def _on_event(self, event: FileSystemEvent) -> None:
        kind = event.event_type
        src = os.fsdecode(event.src_path)
        if event.is_directory:
            if kind in _DIR_EVENTS:
                self._directories_changed(src if kind == "deleted" else None)
            return
        if kind not in _WRITE_EVENTS:
            return
        target = os.fsdecode(event.dest_path) if kind == "moved" else src
        for entry in self._jobs.values():
            if entry.path == target:
                self._touch(entry, done=kind in _DONE_EVENTS)

    def _touch(self, entry: _Job, *, done: bool = False) -> None:
        """A write happened: (re)start its settle time. A close after writing or
        a rename into place means the writer is done: look almost at once, so a
        trainer that saves more often than the settle time still gets copies."""
        entry.seen = _identity(entry.path)
        entry.due = time.monotonic() + (DONE_SETTLE_S if done else self.settle_s)

    def _settle(self) -> None:
        """Report each file that stayed unchanged through its settle time."""
        now = time.monotonic()
        for job, entry in list(self._jobs.items()):
            if entry.due is None or entry.due > now:
                continue
            current = _identity(entry.path)
            if current is None:  # removed or moved away: wait for the next write
                entry.due = entry.seen = None
            elif current != entry.seen:
                entry.seen, entry.due = current, now + self.settle_s
            else:
                entry.due = None
                self._report(job, entry)

    def _report(self, job: str, entry: _Job) -> None:
        """Hand the report to the callback thread, unless one for the job is still queued."""
        with self._queued_lock:
            if job in self._queued:
                return
            self._queued.add(job)
        self._reports.put((job, entry.on_complete, Path(entry.path)))

    def _report_loop(self) -> None:
        """The callback thread: one report at a time, in order."""
        while (item := self._reports.get()) is not _STOP:
            job, on_complete, path = item
            with self._queued_lock:
                self._queued.discard(job)  # a write settling from now on needs a new look
            try:
                on_complete(job, path)
            except Exception:
                log.exception("checkpoint callback failed", job=job, path=str(path))

    # ---- which directory to watch -------------------------------------------------

    def _directories_changed(self, deleted: str | None) -> None:
        """A directory appeared, moved or vanished: move each job's watch if needed."""
        if deleted is not None and deleted in self._dirs:
            # inotify dropped the watch with the directory; forget it so it can be made again
            watch, _ = self._dirs.pop(deleted)
            self._observer.unschedule(watch)
            for entry in self._jobs.values():
                if entry.watched_dir == deleted:
                    entry.watched_dir = None
        for job, entry in self._jobs.items():
            try:
                self._follow(entry)
            except OSError as exc:  # e.g. out of inotify watches: keep serving the others
                log.error("cannot watch checkpoint directory", job=job, path=entry.path, error=str(exc))

    def _follow(self, entry: _Job) -> None:
        """Watch the file's directory, or its nearest existing ancestor until it exists.

        Loops because directories can appear between looking and watching.
        """
        parent = os.path.dirname(entry.path)
        while (wanted := _nearest_dir(parent)) != entry.watched_dir:
            try:
                self._acquire(wanted)
            except OSError:
                if os.path.isdir(wanted):
                    raise
                continue  # it vanished meanwhile: look again
            if entry.watched_dir is not None:
                self._release(entry.watched_dir)
            entry.watched_dir = wanted
            if wanted == parent and os.path.exists(entry.path):
                self._touch(entry)  # written while the directory was not watched yet

    def _acquire(self, directory: str) -> None:
        watch, users = self._dirs.get(directory, (None, 0))
        if watch is None:
            watch = self._observer.schedule(self._handler, directory, recursive=False)
        self._dirs[directory] = (watch, users + 1)

    def _release(self, directory: str) -> None:
        if directory not in self._dirs:
            return
        watch, users = self._dirs[directory]
        if users > 1:
            self._dirs[directory] = (watch, users - 1)
        else:
            del self._dirs[directory]
            self._observer.unschedule(watch)


def _identity(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _nearest_dir(path: str) -> str:
    while not os.path.isdir(path):
        path = os.path.dirname(path)
    return path
