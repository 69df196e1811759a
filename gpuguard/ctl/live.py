"""The commands that keep running: `status --watch`, `events --follow` and
`run --wait`. Each polls the daemon, rides out a daemon restart (see
`Daemon.poll`) and ends quietly on Ctrl-C."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from typing import Any

from gpuguard.contract import EX_TEMPFAIL
from gpuguard.ctl.common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, Daemon, pause, warn
from gpuguard.ctl.output import EVENT_HEADERS, event_line, event_row
from gpuguard.ctl.replies import ended
from gpuguard.ctl.status_table import format_status, look_for

POLL_S = 0.5  # `events --follow` and `run --wait`
FOLLOW_BATCH = 1000  # the most events one poll of `events --follow` asks for
CLEAR = "\x1b[H\x1b[2J"  # cursor home, erase the screen
# "requeued": handed back to the batch scheduler, which starts it on another node (75, EX_TEMPFAIL)
OUTCOME = {"succeeded": EXIT_OK, "failed": EXIT_FAILED, "stopped": EXIT_FAILED, "requeued": EX_TEMPFAIL}


def watch_status(args: argparse.Namespace, daemon: Daemon) -> int:
    """Redraw the status every `args.watch` seconds (on a terminal, in place;
    else one after another; with --json one object per line)."""
    redraw = sys.stdout.isatty() and not args.json
    look = look_for(args.wide, args.no_color)
    try:
        while True:
            status = daemon.poll("status")
            if status is not None and args.json:
                print(json.dumps(status, separators=(",", ":")), flush=True)
            elif status is not None:
                head = f"every {args.watch:g} s: gpuguardctl status  {time.strftime('%Y-%m-%d %H:%M:%S')}"
                print(f"{CLEAR if redraw else ''}{head}\n\n{format_status(status, look)}", end="\n" if redraw else "\n\n")
                sys.stdout.flush()
            pause(args.watch)
    except KeyboardInterrupt:
        return EXIT_OK


class Cursor:
    """Where `events --follow` stands: the newest stored event it knows of,
    and the events it printed before the store had them on disk (no id yet:
    they come back in every poll until written), so none prints twice."""

    def __init__(self, last_id: int) -> None:
        self.last_id = last_id
        self._unstored: deque[tuple[Any, ...]] = deque(maxlen=FOLLOW_BATCH)

    def fresh(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The events of a poll not printed yet; moves the cursor past them."""
        out = []
        for e in events:
            key = event_row(e)
            if e.get("id") is None:
                if key in self._unstored:
                    continue
                self._unstored.append(key)
            else:
                self.last_id = max(self.last_id, e["id"])
                if key in self._unstored:  # printed while it waited for the disk
                    self._unstored.remove(key)
                    continue
            out.append(e)
        return out


def follow_events(args: argparse.Namespace, daemon: Daemon, first: dict[str, Any]) -> int:
    """The events `first` asks for, then each new one as it is stored (the
    daemon is asked for events after the newest id seen), until interrupted."""
    newest = daemon.call("events", {"limit": 1})  # so that old events never count as new
    cursor = Cursor(max((e["id"] for e in newest if e.get("id") is not None), default=0))
    if not args.json:
        print(event_line(EVENT_HEADERS))
    query = first
    try:
        while True:
            batch = daemon.poll("events", query)
            if batch is not None:
                if query is not first and len(batch) >= FOLLOW_BATCH:
                    warn(f"events: more than {FOLLOW_BATCH} new events within {POLL_S:g} s; older ones not shown")
                for e in cursor.fresh(batch):
                    print(json.dumps(e) if args.json else event_line(event_row(e)))
                sys.stdout.flush()
                query = {"gpu": first["gpu"], "job": first["job"], "limit": FOLLOW_BATCH, "since_id": cursor.last_id}
            pause(POLL_S)
    except KeyboardInterrupt:
        return EXIT_OK


def wait_for_job(name: str, daemon: Daemon, as_json: bool = False) -> int:
    """Poll the status until job `name` ends: exit 0 if it succeeded, 1 if it
    failed or was stopped, 75 if it was requeued in the batch scheduler (with
    `as_json`, its entry of `status --json` is printed either way). Ctrl-C
    leaves the job running."""
    try:
        while True:
            status = daemon.poll("status")
            if status is not None:
                job = next((j for j in status.get("jobs") or [] if j.get("name") == name), None)
                if job is None:
                    warn(f"run: job {name} is no longer known to the daemon")
                    return EXIT_FAILED
                code = OUTCOME.get(str(job.get("state")))
                if code is not None:
                    return _ended(job, code, as_json)
            time.sleep(POLL_S)  # not `pause`: a reader gone from stdout leaves the exit code to wait for
    except KeyboardInterrupt:
        warn(f"run: stopped waiting; job {name} is still running (gpuguardctl stop {name} stops it)")
        return EXIT_INTERRUPTED


def _ended(job: dict[str, Any], code: int, as_json: bool) -> int:
    """Say how the job ended: on stdout when it succeeded, else on stderr."""
    if as_json:
        print(json.dumps(job, indent=2))
    elif code == EXIT_OK:
        print(ended(job))
    if code == EX_TEMPFAIL:
        warn(f"run: job {job.get('name')} requeued: {job.get('reason') or 'no reason given'}; the scheduler will restart it elsewhere")
    elif code != EXIT_OK:
        warn(f"run: job {job.get('name')} {job.get('state')}: {job.get('reason') or 'no reason given'}")
    return code
