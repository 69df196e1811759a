"""What gpuguardctl prints for each command: tables and sentences for
people, JSON for scripts."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

from gpuguard.ctl.common import CHECK_EXIT, EXIT_FAILED, EXIT_OK, warn
from gpuguard.ctl.replies import SENTENCES
from gpuguard.ctl.status_table import format_status, look_for
from gpuguard.ctl.tables import cell, short_uuid, table

EVENT_HEADERS = ("TIME", "SEVERITY", "KIND", "GPU", "JOB", "MESSAGE")
# `events --follow` prints as events come, so its columns cannot be sized to
# the rows: these widths fit a timestamp, every severity and most kinds
_EVENT_WIDTHS = (24, 8, 21, 12, 12)


def print_status(args: argparse.Namespace, status: dict[str, Any]) -> int:
    print(json.dumps(status, indent=2) if args.json else format_status(status, look_for(args.wide, args.no_color)))
    return EXIT_OK


def event_row(e: dict[str, Any]) -> tuple[Any, ...]:
    return (e.get("ts"), e.get("severity"), e.get("kind"), short_uuid(e.get("gpu")), e.get("job"), e.get("message"))


def event_line(cells: Sequence[Any]) -> str:
    """One row of `events --follow`: fixed columns, the message last."""
    padded = [cell(c).ljust(w) for c, w in zip(cells[:-1], _EVENT_WIDTHS)]
    return "  ".join([*padded, cell(cells[-1])]).rstrip()


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
    """One line for a scheduler; none and exit 1 when no GPU is healthy."""
    if not gpus:
        warn("healthy: no GPU is healthy now (gpuguardctl status says why)")
        return EXIT_FAILED
    key = "index" if args.format == "index" else "uuid"
    print(",".join(str(g[key]) for g in gpus))
    return EXIT_OK


def print_check(args: argparse.Namespace, verdict: dict[str, Any]) -> int:
    status = verdict.get("status")
    print(verdict.get("message") or f"gpuguard: {status}")
    return CHECK_EXIT.get(str(status), CHECK_EXIT["unknown"])


def print_reply(args: argparse.Namespace, reply: Any) -> int:
    """A changing command: what it did in a sentence, or (--json) the daemon's reply."""
    if args.json or not isinstance(reply, dict):
        print(json.dumps(reply, indent=2))
    else:
        print(SENTENCES[args.command](reply))
    return EXIT_OK


OUTPUT: dict[str, Callable[[argparse.Namespace, Any], int]] = {
    "status": print_status,
    "events": print_events,
    "snapshots": print_snapshots,
    "healthy": print_healthy,
    "check": print_check,
    **{name: print_reply for name in SENTENCES},
}
