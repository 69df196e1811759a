"""The client side of the control socket: one request, one reply.

Stdlib only (no structlog), so it loads fast for gpuguardctl and health-check
hooks that run it every few seconds.
"""

from __future__ import annotations

import random
import socket
import time
from pathlib import Path
from typing import Any

from gpuguard.control.protocol import MAX_REQUEST_BYTES, ProtocolError, decode_reply, encode_request

MAX_REPLY_BYTES = 256 * 1024 * 1024  # a long event history is large, but not this large
CONNECT_RETRY_S = 0.005
BUSY_RETRY_S = 2.0  # how long a "busy" answer is tried again (see `request`)
BUSY_PAUSE_S = (0.01, 0.25)  # the first and the longest pause between those tries


class DaemonUnreachable(Exception):
    """No daemon answered on the socket: `reason` says why."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot reach gpuguardd at {path}: {reason}")
        self.path = path
        self.reason = reason


class CommandFailed(Exception):
    """The daemon answered with an error (`code` as on the wire)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def request(
    socket_path: Path, cmd: str, args: dict[str, Any], timeout_s: float = 10.0, busy_retry_s: float = BUSY_RETRY_S
) -> Any:
    """Send one command and return its result; `timeout_s` bounds the whole exchange.

    "busy" means the daemon turned the connection away at its limits without carrying the
    request out, so any command may be sent again: it is, with a growing, jittered pause,
    for up to `busy_retry_s` (within `timeout_s`). A client's own previous connection is
    still counted for a moment after its reply: churn near the limits is no failure, a
    daemon that stays full is."""
    path = Path(socket_path)
    line = encode_request(cmd, args)
    if len(line) > MAX_REQUEST_BYTES:
        raise CommandFailed(f"request too large ({len(line)} bytes, limit {MAX_REQUEST_BYTES})", "bad_request")
    started = time.monotonic()
    deadline, give_up = started + timeout_s, started + min(busy_retry_s, timeout_s)
    pause = BUSY_PAUSE_S[0]
    while True:
        try:
            return _exchange(path, line, deadline, timeout_s)
        except CommandFailed as exc:
            if exc.code != "busy" or time.monotonic() + pause >= give_up:
                raise
        time.sleep(pause * random.uniform(0.5, 1.0))  # clients turned away together do not come back together
        pause = min(2 * pause, BUSY_PAUSE_S[1])


def _exchange(path: Path, line: bytes, deadline: float, timeout_s: float) -> Any:
    """One connection: the request line out, its reply back."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            _connect(sock, path, deadline)
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                sock.sendall(line)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the daemon may have answered ("busy") and closed first: read that
            reply_line = _read_reply(sock, deadline)
        except FileNotFoundError:
            raise DaemonUnreachable(path, "no such socket (is gpuguardd running?)") from None
        except ConnectionRefusedError:
            raise DaemonUnreachable(path, "connection refused (is gpuguardd running?)") from None
        except PermissionError:
            raise DaemonUnreachable(path, "permission denied (need root or the gpuguard admin group?)") from None
        except TimeoutError:
            raise DaemonUnreachable(path, f"no reply within {timeout_s:g} s") from None
        except OSError as exc:
            raise DaemonUnreachable(path, exc.strerror or str(exc)) from None
    if reply_line is None:
        raise DaemonUnreachable(path, "the daemon closed the connection without a reply")
    try:
        reply = decode_reply(reply_line)
    except ProtocolError as exc:
        raise DaemonUnreachable(path, f"not a gpuguardd reply: {exc}") from None
    if not reply.ok:
        raise CommandFailed(reply.error, reply.code)
    return reply.result


def _connect(sock: socket.socket, path: Path, deadline: float) -> None:
    """Connect, trying again while the daemon's backlog is full: a Unix socket
    refuses a connect with EAGAIN then, which means "busy, come back", not "gone"."""
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            sock.connect(str(path))
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError from None
            time.sleep(CONNECT_RETRY_S)


def _read_reply(sock: socket.socket, deadline: float) -> bytes | None:
    buf = bytearray()
    searched = 0  # bytes of buf already known to hold no newline
    while True:
        end = buf.find(b"\n", searched)
        if end >= 0:
            return bytes(buf[:end])
        searched = len(buf)
        if len(buf) > MAX_REPLY_BYTES:
            raise OSError(f"reply larger than {MAX_REPLY_BYTES} bytes")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = sock.recv(1 << 20)
        if not chunk:
            return None
        buf += chunk
