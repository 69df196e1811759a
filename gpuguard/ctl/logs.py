"""`logs NAME`: the job's own output. The daemon says where the file is
(`status`); the file is read by the caller, so the OS decides who may."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import BinaryIO

from gpuguard.ctl.common import EXIT_FAILED, EXIT_OK, Daemon, pause, warn

BLOCK = 64 * 1024
FOLLOW_S = 0.25  # how often --follow looks for more output


def show_logs(args: argparse.Namespace, daemon: Daemon) -> int:
    """The last `args.lines` lines, then (--follow) what is written after them."""
    jobs = daemon.call("status").get("jobs") or []
    job = next((j for j in jobs if j.get("name") == args.name), None)
    if job is None:
        warn(f"logs: no job {args.name!r}")
        return EXIT_FAILED
    path = Path(job["log"])
    try:
        try:
            f: BinaryIO | None = path.open("rb")
        except FileNotFoundError:
            warn(f"logs: job {args.name} has no output yet ({path}){'; waiting for it' if args.follow else ''}")
            if not args.follow:
                return EXIT_OK
            f = None
        if f is not None:
            sys.stdout.buffer.write(last_lines(f, args.lines))
            sys.stdout.buffer.flush()
        if args.follow:
            follow(path, f)
        elif f is not None:
            f.close()
    except PermissionError:
        who = f", {job['user']}" if job.get("user") else ""
        warn(f"logs: cannot read {path}: permission denied (the job's output is for root and the job's user{who})")
        return EXIT_FAILED
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def last_lines(f: BinaryIO, n: int) -> bytes:
    """The last `n` lines of `f`, read backwards a block at a time; leaves
    `f` at the end it saw."""
    end = f.seek(0, os.SEEK_END)
    pos, data = end, b""
    while n and pos > 0 and data.count(b"\n") <= n:  # n + 1 newlines bound n whole lines
        step = min(BLOCK, pos)
        pos -= step
        f.seek(pos)
        data = f.read(step) + data
    f.seek(end)
    return b"".join(data.splitlines(keepends=True)[-n:]) if n else b""


def follow(path: Path, f: BinaryIO | None) -> None:
    """Copy what is appended to the file until interrupted, as `tail -F`:
    from the start again after a truncation, the new file after a
    replacement, the file once it appears."""
    out = sys.stdout.buffer
    try:
        while True:
            chunk = f.read(BLOCK) if f is not None else b""
            if chunk:
                out.write(chunk)
                out.flush()
                continue
            pause(FOLLOW_S)
            f = _current(path, f)
    finally:
        if f is not None:
            f.close()


def _current(path: Path, f: BinaryIO | None) -> BinaryIO | None:
    """The file to read on from: `f` (rewound if it was truncated) or the
    one at `path` now. Called only once `f` is read to its end."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return f
    if f is not None:
        mine = os.fstat(f.fileno())
        if (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino):
            if mine.st_size < f.tell():
                f.seek(0)
            return f
        f.close()
    return path.open("rb")
