"""The control socket's door: who gets in, and who gets a thread.

The accept thread admits each connection by the uid SO_PEERCRED gives
(`limits.Admission`: slots per uid, some kept for root and for `check` and
`status`), then waits for the first request line of every admitted
connection at once. Only a connection with a whole line (or too much without
one) is handed to a thread of its own. So a user who holds a thousand idle
connections, or connects and closes in a loop, costs no thread and no
user-database lookup, and the backlog drains fast enough that other clients'
connects still go through; a first line later than the lane's deadline closes
the connection and frees its slot.
"""

from __future__ import annotations

import math
import select
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import structlog

from gpuguard.control.limits import Admission, Lane
from gpuguard.control.protocol import MAX_REQUEST_BYTES, encode_error

log = structlog.get_logger("gpuguard.control")

ACCEPT_BATCH = 256  # connections taken per wake-up before the stop signal is looked at again
REFUSED_LOG_EVERY_S = 60.0  # a flood of refused connections logs one warning a minute, not one each
BUSY = "daemon busy: too many control connections (from this user or in all)"
_BUSY_LINE = encode_error(BUSY + ", try again", "busy")
_PEERCRED = struct.Struct("3i")

Ids = tuple[int, int, int]  # pid, uid, gid
HandOff = Callable[[socket.socket, Ids, Lane, bytearray], None]


@dataclass(slots=True)
class _Pending:
    conn: socket.socket
    ids: Ids
    lane: Lane
    deadline: float
    buf: bytearray = field(default_factory=bytearray)


class Door:
    """Runs on the accept thread until `wake` turns readable."""

    def __init__(
        self,
        listener: socket.socket,
        wake: socket.socket,
        admission: Admission,
        timeouts: Mapping[Lane, float],
        hand_off: HandOff,
    ) -> None:
        self.listener = listener
        self.wake = wake
        self.admission = admission
        self.timeouts = timeouts
        self.hand_off = hand_off
        self._pending: dict[int, _Pending] = {}
        self._poller = select.poll()
        self._refused_logged_at = -REFUSED_LOG_EVERY_S

    def run(self) -> None:
        """Accept, admit, read first lines and hand them off; on wake, close what waits."""
        self._poller.register(self.listener, select.POLLIN)
        self._poller.register(self.wake, select.POLLIN)
        try:
            while True:
                for fd, _ in self._poller.poll(self._poll_timeout_ms()):
                    if fd == self.wake.fileno():
                        return
                    if fd == self.listener.fileno():
                        self._accept_batch()
                    elif (pending := self._pending.get(fd)) is not None:
                        self._read(pending)
                self._expire()
        finally:
            for pending in list(self._pending.values()):
                self._drop(pending)

    def _poll_timeout_ms(self) -> int | None:
        if not self._pending:
            return None
        earliest = min(p.deadline for p in self._pending.values())
        return max(0, math.ceil((earliest - time.monotonic()) * 1000))

    def _accept_batch(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("control accept failed", error=str(exc))
                time.sleep(0.05)  # e.g. EMFILE: do not spin
                return
            try:
                self._admit(conn)
            except OSError as exc:  # e.g. the peer is gone already: this one only, never the door
                log.debug("control connection dropped at the door", error=str(exc))
                conn.close()

    def _admit(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        ids = peer_ids(conn)
        lane = self.admission.admit(ids[1])
        if lane is None:
            self._log_refused(ids)
            refuse_busy(conn)
            return
        pending = _Pending(conn, ids, lane, time.monotonic() + self.timeouts[lane])
        self._pending[conn.fileno()] = pending
        self._poller.register(conn, select.POLLIN)

    def _read(self, pending: _Pending) -> None:
        try:
            chunk = pending.conn.recv(MAX_REQUEST_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:  # gone before a whole line: dropped quietly
            self._drop(pending)
            return
        pending.buf += chunk
        if b"\n" in chunk or len(pending.buf) >= MAX_REQUEST_BYTES:
            self._forget(pending)
            self.hand_off(pending.conn, pending.ids, pending.lane, pending.buf)

    def _expire(self) -> None:
        now = time.monotonic()
        for pending in [p for p in self._pending.values() if p.deadline <= now]:
            log.debug("control client too slow, dropped", pid=pending.ids[0], uid=pending.ids[1])
            self._drop(pending)

    def _forget(self, pending: _Pending) -> None:
        self._poller.unregister(pending.conn)
        del self._pending[pending.conn.fileno()]

    def _drop(self, pending: _Pending) -> None:
        self._forget(pending)
        pending.conn.close()
        self.admission.release(pending.ids[1], pending.lane)

    def _log_refused(self, ids: Ids) -> None:
        """Say in the log who is over the limits, at most once a minute."""
        now = time.monotonic()
        if now - self._refused_logged_at >= REFUSED_LOG_EVERY_S:
            self._refused_logged_at = now
            log.warning("control connection refused: too many open", pid=ids[0], uid=ids[1])


def peer_ids(conn: socket.socket) -> Ids:
    """pid, uid, gid from SO_PEERCRED (the kernel's word, not the client's)."""
    pid, uid, gid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return pid, uid, gid


def refuse_busy(conn: socket.socket) -> None:
    """Answer "busy" and close, never waiting: a fresh socket's buffer takes one line."""
    with conn:
        try:
            conn.setblocking(False)
            conn.send(_BUSY_LINE)
        except OSError:
            pass
