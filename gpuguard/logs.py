"""One structlog processor chain for gpuguard and the libraries under it.

Console rendering on a TTY, JSON lines otherwise. Under journald (the unit's
stderr is a journal stream) each line starts with its syslog priority
(`<3>` ...), so `journalctl -u gpuguard -p err` shows the faults and nothing
else; with python-systemd installed, records go to the journal directly with
structured fields (GPU_UUID, XID, ...).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog

# logging level -> syslog priority (sd-daemon(3))
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

# event-dict keys that become journal fields
JOURNAL_FIELDS = {
    "gpu_uuid": "GPU_UUID",
    "pci_bus_id": "PCI_BUS_ID",
    "gpu_index": "GPU_INDEX",
    "xid": "XID",
    "action": "GPUGUARD_ACTION",
    "kind": "GPUGUARD_EVENT",
    "job": "GPUGUARD_JOB",
}


def priority(levelno: int) -> int:
    """The syslog priority for a logging level (levels between round down)."""
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


def under_journald(stream: TextIO) -> bool:
    """True when `stream` is the journal stream systemd connected (JOURNAL_STREAM)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class _PrefixedFormatter(structlog.stdlib.ProcessorFormatter):
    """Prepends `<N>` so journald stores each line at its priority."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{priority(record.levelno)}>{super().format(record)}"


class _JournalHandler(logging.Handler):
    """Sends each record to journald with gpuguard's fields as journal fields."""

    def __init__(self, send: Any) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = record.msg if isinstance(record.msg, dict) else {}
            fields = {
                JOURNAL_FIELDS[key]: str(value)
                for key, value in event.items()
                if key in JOURNAL_FIELDS and value is not None
            }
            self._send(
                self.format(record),
                PRIORITY=str(priority(record.levelno)),
                SYSLOG_IDENTIFIER="gpuguardd",
                **fields,
            )
        except Exception:  # a logging failure must never take the daemon down
            self.handleError(record)


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
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
    handler: logging.Handler
    send = _journal_send() if journald else None
    if send is not None:
        handler = _JournalHandler(send)
        handler.setFormatter(structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=processors))
    else:
        handler = logging.StreamHandler(stream)
        cls = _PrefixedFormatter if journald else structlog.stdlib.ProcessorFormatter
        handler.setFormatter(cls(foreign_pre_chain=shared, processors=processors))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())


def _journal_send() -> Any:
    """python-systemd's journal.send when installed (the `journal` extra)."""
    try:
        from systemd import journal  # type: ignore[import-not-found]
    except ImportError:
        return None
    return journal.send
