"""One structlog processor chain for gpuguard and the libraries under it.

Console rendering on a TTY, JSON lines otherwise. Under journald (stderr is
the journal stream systemd connected, JOURNAL_STREAM) each record goes to
journald's native socket with gpuguard's fields as journal fields (GPU_UUID,
XID, JOB, EVENT_KIND, a MESSAGE_ID per event kind), so
`journalctl -u gpuguard XID=79` finds the faults; no extra package is needed.
Without that socket, or when a send fails, the line goes to stderr starting
with its syslog priority (`<3>` ...), so `journalctl -u gpuguard -p err`
shows the faults either way.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import stat
import struct
import sys
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

import structlog

JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
SYSLOG_IDENTIFIER = "gpuguardd"  # the unit's SyslogIdentifier=: `journalctl -t gpuguardd` shows both paths
# MESSAGE_ID = uuid5(this namespace, event kind): the same on every host and
# version; systemd/gpuguard.catalog explains each one (`journalctl -x`).
MESSAGE_ID_NAMESPACE = uuid.UUID("904f280b-21ba-406c-89e2-115fe0e13f02")
SEND_TIMEOUT_S = 0.5  # a journald that stops reading delays a record this long, then stderr gets it
_SNDBUF = 8 << 20  # as the protocol advises: delay blocking (the kernel caps it at wmem_max)
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL

# logging level -> syslog priority (sd-daemon(3))
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

# event-dict keys that become journal fields
JOURNAL_FIELDS = {
    "gpu_uuid": "GPU_UUID",
    "pci_bus_id": "PCI_BUS_ID",
    "gpu_index": "GPU_INDEX",
    "xid": "XID",
    "action": "GPUGUARD_ACTION",
    "kind": "EVENT_KIND",
    "job": "JOB",
}


def priority(levelno: int) -> int:
    """The syslog priority for a logging level (levels between round down)."""
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


def message_id(kind: str) -> str:
    """The journal MESSAGE_ID of an event kind: 32 hex digits, stable."""
    return uuid.uuid5(MESSAGE_ID_NAMESPACE, str(kind)).hex


def under_journald(stream: TextIO) -> bool:
    """True when `stream` is the journal stream systemd connected (JOURNAL_STREAM)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def encode(fields: Iterable[tuple[str, str]]) -> bytes:
    """Journal fields in the native format: `FIELD=value` lines; a value with a
    newline as `FIELD`, newline, 64-bit little-endian length, value, newline."""
    out = bytearray()
    for name, value in fields:
        key, data = name.encode("ascii"), value.encode("utf-8", "backslashreplace")
        if b"\n" in data:
            out += key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key + b"=" + data + b"\n"
    return bytes(out)


class JournalWriter:
    """A client of journald's native protocol (systemd docs/JOURNAL_NATIVE_PROTOCOL.md):
    one datagram per entry; an entry too large for a datagram goes in a sealed
    memfd passed with SCM_RIGHTS, as sd_journal_send() does, so nothing is cut."""

    def __init__(self, path: Path = JOURNAL_SOCKET) -> None:
        self.path = str(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(SEND_TIMEOUT_S)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
        except OSError:
            pass  # the default buffer works, it only blocks sooner

    @classmethod
    def open(cls, path: Path = JOURNAL_SOCKET) -> JournalWriter | None:
        """A writer when a datagram socket listens at `path`, else None."""
        try:
            if not stat.S_ISSOCK(os.stat(path).st_mode):
                return None
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as probe:
                probe.connect(str(path))  # refused when nobody listens; sends nothing
        except OSError:
            return None
        return cls(path)

    def send(self, fields: Iterable[tuple[str, str]]) -> None:
        """Write one entry; OSError when journald cannot take it."""
        payload = encode(fields)
        try:
            self._sock.sendto(payload, self.path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(payload)

    def _send_memfd(self, payload: bytes) -> None:
        fd = os.memfd_create("gpuguard-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
            self._sock.sendmsg([], rights, 0, self.path)  # socket.send_fds drops the address before 3.12
        finally:
            os.close(fd)

    def close(self) -> None:
        self._sock.close()


def journal_fields(record: logging.LogRecord, message: str) -> list[tuple[str, str]]:
    """One record's journal entry: MESSAGE, PRIORITY, where it was logged, and
    gpuguard's fields, with a MESSAGE_ID when it is a gpuguard event."""
    event = record.msg if isinstance(record.msg, dict) else {}
    fields = [
        ("MESSAGE", message),
        ("PRIORITY", str(priority(record.levelno))),
        ("SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER),
        ("LOGGER", record.name),
        ("CODE_FILE", record.pathname),
        ("CODE_LINE", str(record.lineno)),
        ("CODE_FUNC", record.funcName),
    ]
    fields += [(JOURNAL_FIELDS[k], str(v)) for k, v in event.items() if k in JOURNAL_FIELDS and v is not None]
    if event.get("kind") is not None:
        fields.append(("MESSAGE_ID", message_id(event["kind"])))
    return fields


class _PrefixedFormatter(structlog.stdlib.ProcessorFormatter):
    """Prepends `<N>` so journald stores each line at its priority."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{priority(record.levelno)}>{super().format(record)}"


class _JournalHandler(logging.Handler):
    """Sends each record to journald natively; a record journald does not take
    goes to `fallback` (the prefixed stream) instead of being lost."""

    def __init__(self, writer: JournalWriter, fallback: logging.Handler) -> None:
        super().__init__()
        self.writer = writer
        self._fallback = fallback

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.writer.send(journal_fields(record, self.format(record)))
        except OSError:
            self._fallback.handle(record)
        except Exception:  # a logging failure must never take the daemon down
            self.handleError(record)

    def close(self) -> None:
        self.writer.close()
        super().close()


def configure(
    level: str = "info", fmt: str = "auto", stream: TextIO | None = None, journal_socket: Path = JOURNAL_SOCKET
) -> None:
    """Set up structlog and stdlib logging once, for the whole process."""
    stream = stream or sys.stderr
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    journald = under_journald(stream)
    console = fmt == "console" or (fmt == "auto" and stream.isatty() and not journald)
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if console
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
    processors = [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
        structlog.processors.format_exc_info,
        renderer,
    ]
    handler: logging.Handler = logging.StreamHandler(stream)
    cls = _PrefixedFormatter if journald else structlog.stdlib.ProcessorFormatter
    handler.setFormatter(cls(foreign_pre_chain=shared, processors=processors))
    writer = JournalWriter.open(journal_socket) if journald else None
    if writer is not None:
        handler = _JournalHandler(writer, fallback=handler)
        handler.setFormatter(structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=processors))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
