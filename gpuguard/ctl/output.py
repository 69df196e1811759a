"""What gpuguardctl prints: tables for people, JSON for scripts."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

from gpuguard.ctl.common import CHECK_EXIT, EXIT_OK

EVENT_HEADERS = ("TIME", "SEVERITY", "KIND", "GPU", "JOB", "MESSAGE")
# `events --follow` prints as events come, so its columns cannot be sized to
# the rows: these widths fit a timestamp, every severity and most kinds
_EVENT_WIDTHS = (24, 8, 21, 12, 12)


def format_status(status: dict[str, Any]) -> str:
    """The GPUs, the jobs and one line about the daemon."""
    gpus = status.get("gpus") or []
    gpu_table = table(
        ("GPU", "UUID", "STATE", "REASON", "TEMP", "UTIL", "MEM", "JOBS"),
        [
            (
                g.get("index"),
                short_uuid(g.get("uuid")),
                g.get("state"),
                g.get("reason"),
                _unit(g.get("temperature_c"), "C"),
                _unit(g.get("gpu_util_pct"), "%"),
                _memory(g.get("memory_used_bytes"), g.get("memory_total_bytes")),
                ",".join(g.get("jobs") or []),
            )
            for g in gpus
        ],
    )
    jobs = status.get("jobs") or []
    job_table = table(
        ("JOB", "STATE", "GPUS", "ATTEMPT", "RESTARTS", "PID", "CHECKPOINT"),
        [
            (
                j.get("name"),
                j.get("state"),
                ",".join(short_uuid(u) or "" for u in j.get("gpus") or []),
                j.get("attempt"),
                j.get("restarts"),
                j.get("pid"),
                j.get("checkpoint"),
            )
            for j in jobs
        ],
    )
    d = status.get("daemon") or {}
    daemon = (
        f"daemon: gpuguardd {d.get('version', '?')}, backend {d.get('backend', '?')}, "
        f"pid {d.get('pid', '?')}, up {_duration(d.get('uptime_s'))}"
    )
    return "\n\n".join((gpu_table if gpus else "no GPUs", job_table if jobs else "no jobs", daemon))


def print_status(args: argparse.Namespace, status: dict[str, Any]) -> int:
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return EXIT_OK


def event_row(e: dict[str, Any]) -> tuple[Any, ...]:
    return (e.get("ts"), e.get("severity"), e.get("kind"), short_uuid(e.get("gpu")), e.get("job"), e.get("message"))


def event_line(cells: Sequence[Any]) -> str:
    """One row of `events --follow`: fixed columns, the message last."""
    padded = [_cell(c).ljust(w) for c, w in zip(cells[:-1], _EVENT_WIDTHS)]
    return "  ".join([*padded, _cell(cells[-1])]).rstrip()


def print_events(args: argparse.Namespace, events: list[dict[str, Any]]) -> int:
    if args.json:
        print(json.dumps(events, indent=2))
    elif events:
        print(table(EVENT_HEADERS, [event_row(e) for e in events]))
    else:
        print("no events")
    return EXIT_OK


def print_snapshots(args: argparse.Namespace, snapshots: list[dict[str, Any]]) -> int:
    if args.json:
        print(json.dumps(snapshots, indent=2))
        return EXIT_OK
    if not snapshots:
        print(f"no snapshots for {args.name}")
        return EXIT_OK
    keys = list(dict.fromkeys(k for s in snapshots for k in s))
    print(table([k.upper() for k in keys], [[s.get(k) for k in keys] for s in snapshots]))
    return EXIT_OK


def print_healthy(args: argparse.Namespace, gpus: list[dict[str, Any]]) -> int:
    key = "index" if args.format == "index" else "uuid"
    print(",".join(str(g[key]) for g in gpus))
    return EXIT_OK


def print_check(args: argparse.Namespace, verdict: dict[str, Any]) -> int:
    status = verdict.get("status")
    print(verdict.get("message") or f"gpuguard: {status}")
    return CHECK_EXIT.get(str(status), CHECK_EXIT["unknown"])


def print_summary(args: argparse.Namespace, result: Any) -> int:
    """The changing commands: their result as one `key=value` line."""
    if isinstance(result, dict):
        print(summary(result))
    elif result is not None:
        print(json.dumps(result))
    return EXIT_OK


def summary(result: dict[str, Any]) -> str:
    return " ".join(f"{k}={_cell(v)}" for k, v in result.items())


OUTPUT: dict[str, Callable[[argparse.Namespace, Any], int]] = {
    "status": print_status,
    "events": print_events,
    "snapshots": print_snapshots,
    "healthy": print_healthy,
    "check": print_check,
}


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns, two spaces apart; None shows as '-'."""
    cells = [list(headers)] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def short_uuid(uuid: str | None) -> str | None:
    """`GPU-1a2b3c4d`: enough to tell a node's GPUs apart."""
    return uuid[:12] if uuid else uuid


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


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
