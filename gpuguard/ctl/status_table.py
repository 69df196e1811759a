"""`status` for people: the GPUs, why any is not healthy, the jobs (and a
line for each warm standby), a line about the daemon and one about its
shared storage when it has one, within the terminal's width (80 columns off a
terminal) unless --wide, the GPU states coloured only on a terminal."""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gpuguard.ctl.reasons import explain
from gpuguard.ctl.tables import short_uuid, table

DEFAULT_WIDTH = 80
RESET = "\x1b[0m"
STATE_COLOURS = {
    "faulted": "\x1b[31m",  # red
    "excluded": "\x1b[31m",
    "degraded": "\x1b[33m",  # yellow
    "resetting": "\x1b[33m",
    "healthy": "\x1b[32m",  # green
    "unknown": "\x1b[2m",  # dim
}
GPU_HEADERS = ("GPU", "UUID", "STATE", "TEMP", "UTIL", "MEM", "JOBS")
JOB_HEADERS = ("JOB", "STATE", "GPUS", "ATTEMPT", "RESTARTS", "PID", "CHECKPOINT")


@dataclass(frozen=True, slots=True)
class Look:
    """How to draw: the width to fit (None: --wide, no limit, full UUIDs), colour or not."""

    width: int | None = DEFAULT_WIDTH
    colour: bool = False


def look_for(wide: bool, no_color: bool) -> Look:
    """The look for stdout: its terminal's width (80 off a terminal), colour only
    on a terminal and never with --no-color or NO_COLOR set (no-color.org)."""
    tty = sys.stdout.isatty()
    width = None if wide else shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns
    colour = tty and not no_color and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
    return Look(width, colour)


def paint_state(state: str) -> str:
    colour = STATE_COLOURS.get(state.strip())
    return f"{colour}{state}{RESET}" if colour else state


def format_status(status: dict[str, Any], look: Look = Look()) -> str:
    """The GPU table, a sentence for each GPU that is not healthy, the job table, the daemon line."""
    gpus = status.get("gpus") or []
    jobs = status.get("jobs") or []
    wide = look.width is None
    uuid: Callable[[str | None], str | None] = (lambda u: u) if wide else short_uuid
    paint = {2: paint_state} if look.colour else None
    gpu_rows = [
        (
            g.get("index"),
            uuid(g.get("uuid")),
            g.get("state"),
            _unit(g.get("temperature_c"), "C"),
            _unit(g.get("gpu_util_pct"), "%"),
            _memory(g.get("memory_used_bytes"), g.get("memory_total_bytes")),
            ",".join(g.get("jobs") or []),
        )
        for g in gpus
    ]
    parts = [table(GPU_HEADERS, gpu_rows, width=look.width, shrink=(6,), paint=paint) if gpus else "no GPUs"]
    notes = [_note(g, look.width) for g in gpus if g.get("state") != "healthy"]
    if notes:
        parts.append("\n".join(notes))
    index = {g.get("uuid"): g.get("index") for g in gpus}
    job_rows = [
        (
            j.get("name"),
            j.get("state"),
            ",".join(str(u if wide else index.get(u, short_uuid(u))) for u in j.get("gpus") or []),
            j.get("attempt"),
            j.get("restarts"),
            j.get("pid"),
            j.get("checkpoint"),
        )
        for j in jobs
    ]
    parts.append(table(JOB_HEADERS, job_rows, width=look.width, shrink=(0, 2, 6)) if jobs else "no jobs")
    standbys = [_standby(j) for j in jobs if isinstance(j.get("standby"), dict)]
    if standbys:
        parts.append("\n".join(standbys))
    d = status.get("daemon") or {}
    daemon = (
        f"daemon: gpuguardd {d.get('version', '?')}, backend {d.get('backend', '?')}, "
        f"pid {d.get('pid', '?')}, up {_duration(d.get('uptime_s'))}"
    )
    storage = d.get("storage")
    parts.append(daemon + ("\n" + _storage(storage) if isinstance(storage, dict) else ""))
    return "\n\n".join(parts)


def _standby(job: dict[str, Any]) -> str:
    """`train: warm standby pid 888 waiting` (the next attempt, started ahead: docs/STANDBY.md)."""
    sb = job["standby"]
    return f"{job.get('name')}: warm standby pid {sb.get('pid', '?')} {sb.get('state', '?')}"


def _storage(storage: dict[str, Any]) -> str:
    """`storage: s3://bucket/prefix, available, 0 uploads pending` or why it is not."""
    state = "available" if storage.get("available") else f"UNAVAILABLE ({storage.get('problem') or 'unknown'})"
    pending = storage.get("pending_uploads")
    return f"storage: {storage.get('url', '?')}, {state}, {pending if pending is not None else '?'} upload(s) pending"


def _note(gpu: dict[str, Any], width: int | None) -> str:
    """`GPU 1: Xid 48 (Double Bit ECC Error). Reset the GPU.`, wrapped to `width`."""
    text = f"GPU {gpu.get('index')}: {explain(gpu)}"
    return textwrap.fill(text, width, subsequent_indent="    ", break_on_hyphens=False) if width else text


def _unit(value: Any, unit: str) -> str | None:
    return None if value is None else f"{value}{unit}"


def _memory(used: Any, total: Any) -> str | None:
    if not isinstance(used, (int, float)) or not isinstance(total, (int, float)):
        return None
    gib = 1024**3
    return f"{used / gib:.1f}/{total / gib:.1f}GiB"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "?"
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{s:02d}s"
