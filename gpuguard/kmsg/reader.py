"""Follows the kernel log and hands out the Xids (and PCI-to-UUID lines) in it.

Three kinds of path, told apart by what `open` finds:

- a character device, i.e. the real /dev/kmsg: each read() returns one
  record, EAGAIN means caught up, EPIPE means the kernel overwrote records
  we had not read yet (logged, then reading goes on); waits with poll();
- a regular file (tests, the simulator): read from the start, then followed
  like `tail -F`: a partial last line waits for its newline; a truncated or
  replaced file is read again from its start;
- a FIFO: followed like a file, opened non-blocking so a missing writer never
  blocks. Files and FIFOs are waited on by short sleeps (no inotify needed),
  10 ms while lines arrive and 40 ms once the file is quiet.

Records already there when the source opened (the device's records before
its first EAGAIN, a file's content at open) come back `historical=True`.
Bad bytes are decoded with replacement, over-long lines are cut at 8 KiB:
nothing in the log makes `read()` raise or stall.
"""

from __future__ import annotations

import errno
import os
import select
import stat
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil
import structlog

from gpuguard.kmsg.parser import MAX_RECORD_CHARS, KernelLogParser, PciMapping, parse_record
from gpuguard.observations import XidObservation

log = structlog.get_logger(__name__)

MAX_LINE_BYTES = MAX_RECORD_CHARS
FOLLOW_SLEEP_S = 0.01  # files and FIFOs: how often to look for new lines while lines arrive
IDLE_SLEEP_S = 0.04  # ... and once the file has been quiet for IDLE_AFTER_S (idle CPU stays low)
IDLE_AFTER_S = 2.0
_READ_SIZE = 64 * 1024  # /dev/kmsg refuses reads shorter than a record with EINVAL
_MAX_BATCH_BYTES = 1 << 20  # one read() returns after this much, so history never holds it long
_MAX_BATCH_RECORDS = 4096
_MISSING_RETRY_S = IDLE_SLEEP_S  # a path that does not exist yet
_ERROR_RETRY_S = 1.0  # a path that exists but does not open (permissions)
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC

Found = XidObservation | PciMapping
Line = tuple[str, bool]  # (text, historical)


class KmsgDevice:
    """/dev/kmsg (or anything that hands out one record per read): records as lines."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)
        self._caught_up = False  # the first EAGAIN ends the start-up history

    def poll(self, timeout_s: float) -> list[Line]:
        """The records available now, else those that arrive within timeout_s."""
        lines = self._drain()
        if lines:
            return lines
        started = time.monotonic()
        if self._poller.poll(max(0, int(timeout_s * 1000))):
            lines = self._drain()
            if not lines:  # woken by a hang-up, not data: do not let the caller spin
                time.sleep(max(0.0, timeout_s - (time.monotonic() - started)))
        return lines

    def close(self) -> None:
        os.close(self._fd)

    def _drain(self) -> list[Line]:
        lines: list[Line] = []
        while len(lines) < _MAX_BATCH_RECORDS:
            historical = not self._caught_up
            try:
                chunk = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                self._caught_up = True
                break
            except BrokenPipeError:
                log.warning("kmsg_records_overwritten", detail="the kernel log wrapped before it was read")
                continue
            if not chunk:
                self._caught_up = True
                break
            # a record is its first line; the lines after it are its key=value dictionary
            record = chunk.split(b"\n", 1)[0][:MAX_LINE_BYTES]
            lines.append((record.decode("utf-8", "replace"), historical))
        return lines


class FileFollower:
    """A regular file or FIFO, followed like `tail -F`, as lines."""

    def __init__(self, path: Path, fd: int, st: os.stat_result, *, history: bool) -> None:
        self._path = path
        self._fifo = stat.S_ISFIFO(st.st_mode)
        self._last_data = time.monotonic()
        self._start(fd, st, history_end=st.st_size if history and not self._fifo else 0)

    def _start(self, fd: int, st: os.stat_result, *, history_end: int) -> None:
        self._fd = fd
        self._ident = (st.st_dev, st.st_ino)
        self._offset = 0  # bytes read from this file so far
        self._history_end = history_end  # lines ending at or before here were there at open
        self._buf = bytearray()  # the partial last line
        self._discarding = False  # inside an over-long line whose first 8 KiB went out

    def poll(self, timeout_s: float) -> list[Line]:
        """The complete lines available now, else those that arrive within timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            lines = self._read_available()
            now = time.monotonic()
            if lines:
                self._last_data = now
                return lines
            if not self._fifo and self._reopened():
                continue
            remaining = deadline - now
            if remaining <= 0:
                return []
            nap = FOLLOW_SLEEP_S if now - self._last_data < IDLE_AFTER_S else IDLE_SLEEP_S
            time.sleep(min(nap, remaining))

    def close(self) -> None:
        os.close(self._fd)

    def _read_available(self) -> list[Line]:
        lines: list[Line] = []
        total = 0
        while total < _MAX_BATCH_BYTES:
            try:
                chunk = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:  # a FIFO with a writer and nothing written
                break
            if not chunk:
                break
            total += len(chunk)
            self._offset += len(chunk)
            self._split(chunk, lines)
        return lines

    def _split(self, chunk: bytes, lines: list[Line]) -> None:
        chunk_start = self._offset - len(chunk)
        start = 0
        while (nl := chunk.find(b"\n", start)) >= 0:
            if self._discarding:
                self._discarding = False
            else:
                self._buf += chunk[start : min(nl, start + MAX_LINE_BYTES - len(self._buf))]
                self._emit(lines, end=chunk_start + nl + 1)
            start = nl + 1
        if not self._discarding:
            self._buf += chunk[start : start + MAX_LINE_BYTES + 1 - len(self._buf)]
            if len(self._buf) > MAX_LINE_BYTES:  # cut it now; drop the rest of the line
                del self._buf[MAX_LINE_BYTES:]
                self._emit(lines, end=self._offset)
                self._discarding = True

    def _emit(self, lines: list[Line], *, end: int) -> None:
        lines.append((self._buf.decode("utf-8", "replace"), end <= self._history_end))
        self._buf.clear()

    def _reopened(self) -> bool:
        """Start again from the top of a truncated or replaced file; True if it did."""
        try:
            st = os.stat(self._path)
        except OSError:
            return False  # moved away and not back yet: keep what is open
        if (st.st_dev, st.st_ino) != self._ident:
            try:
                fd = os.open(self._path, _OPEN_FLAGS)
                st = os.fstat(fd)
            except OSError as exc:
                log.warning("kernel_log_reopen_failed", path=str(self._path), error=str(exc))
                return False
            os.close(self._fd)
            self._start(fd, st, history_end=0)
            log.info("kernel_log_replaced", path=str(self._path))
            return True
        if st.st_size < self._offset:
            os.lseek(self._fd, 0, os.SEEK_SET)
            self._start(self._fd, st, history_end=0)
            log.info("kernel_log_truncated", path=str(self._path))
            return True
        return False


class KernelLogSource:
    """The kernel log at `path`, read into Xid observations and PCI mappings.

    A path that does not exist yet is waited for (its lines are then new, not
    history); one that does not open is retried and the error logged once.
    """

    def __init__(self, path: Path, *, boot_time: float | None = None) -> None:
        self.path = Path(path)
        self._parser = KernelLogParser(boot_time=psutil.boot_time() if boot_time is None else boot_time)
        self._stream: KmsgDevice | FileFollower | None = None
        self._lock = threading.Lock()  # close() waits for a read() in progress: its fd must not be reused under it
        self._closed = False
        self._retry_at = 0.0
        self._last_error: str | None = None
        self._open(history=True)

    def read(self, timeout_s: float) -> list[Found]:
        """What arrived, blocking at most timeout_s when nothing has."""
        with self._lock:
            if self._closed:
                return []
            deadline = time.monotonic() + timeout_s
            while self._stream is None:
                if time.monotonic() >= self._retry_at:
                    self._open(history=False)
                remaining = deadline - time.monotonic()
                if self._stream is None:
                    if remaining <= 0:
                        return []
                    time.sleep(min(remaining, max(FOLLOW_SLEEP_S, self._retry_at - time.monotonic())))
            lines = self._stream.poll(max(0.0, deadline - time.monotonic()))
            return self._parse(lines)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._stream is not None:
                self._stream.close()
                self._stream = None

    def _parse(self, lines: list[Line]) -> list[Found]:
        found: list[Found] = []
        now = time.time()
        for text, historical in lines:
            record = parse_record(text)
            if record is None:
                continue
            item = self._parser.feed(record, now=now)
            if isinstance(item, XidObservation) and historical:
                item = replace(item, historical=True)
            if item is not None:
                found.append(item)
        return found

    def _open(self, *, history: bool) -> None:
        try:
            fd = os.open(self.path, _OPEN_FLAGS)
        except OSError as exc:
            missing = exc.errno == errno.ENOENT
            self._retry_at = time.monotonic() + (_MISSING_RETRY_S if missing else _ERROR_RETRY_S)
            if str(exc) != self._last_error:
                self._last_error = str(exc)
                if missing:
                    log.info("kernel_log_missing", path=str(self.path))
                else:
                    log.error("kernel_log_unavailable", path=str(self.path), error=str(exc))
            return
        st = os.fstat(fd)
        if stat.S_ISCHR(st.st_mode):
            self._stream = KmsgDevice(fd)
        else:
            self._stream = FileFollower(self.path, fd, st, history=history)
        if self._last_error is not None:
            log.info("kernel_log_opened", path=str(self.path))
            self._last_error = None
