"""Event-store growth: bytes on disk per event, and per day at fault rates.

Appends events shaped like the daemon's (an Xid with its data, the
checkpoint/restart events of the job on that GPU, exclusion and reset) to a
fresh EventStore, measures the database (with its WAL, after a checkpoint)
per event, and projects a day at a quiet, a realistic and a bad fault rate.
Retention (`event_retention_days`, `event_retention_max_rows`) bounds it
whatever the rate.

Usage: python bench/store_growth.py [--events 20000] [--write-docs]
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from docblock import replace_block  # noqa: E402
from gpuguard.config import DaemonConfig  # noqa: E402
from gpuguard.events import Event  # noqa: E402
from gpuguard.health.types import Severity  # noqa: E402
from gpuguard.store import EventStore  # noqa: E402

GPU = "GPU-1be6a911-c4af-50c9-acb3-ce50f94f8531"
# one GPU fault as the daemon records it: the Xid, the job's reaction, the GPU's way back
FAULT = [
    Event(kind="xid", severity=Severity.CRITICAL, gpu=GPU, xid=95,
          message="Xid 95 (Uncontained memory error): reset the GPU",
          data={"source": "kmsg", "action": "reset_gpu", "pci_bus_id": "00000000:18:00.0", "pid": 4242,
                "process": "python", "detail": "pid=4242, name=python, Ch 00000010"}),
    Event(kind="gpu_excluded", severity=Severity.WARNING, gpu=GPU,
          message="GPU 0 excluded by gpuguard: Xid 95 (Uncontained memory error): reset the GPU",
          data={"by": "gpuguard", "pci_bus_id": "00000000:18:00.0"}),
    Event(kind="checkpoint_requested", severity=Severity.WARNING, gpu=GPU, job="yolo",
          message="job yolo: GPU 0 Xid 95 (Uncontained memory error): reset the GPU: checkpoint, then move to a healthy GPU"),
    Event(kind="snapshot_saved", severity=Severity.INFO, job="yolo",
          message="job yolo: checkpoint /srv/train/runs/detect/train/weights/last.pt saved as snapshot 20261127T075615Z-000002-8a9a8116"),
    Event(kind="job_stopping_done", severity=Severity.INFO, job="yolo",
          message="job yolo stopped for a restart (exit 75, after the checkpoint signal)"),
    Event(kind="job_restarted", severity=Severity.INFO, job="yolo",
          message="job yolo attempt 2 started on GPU 1 (pid 20130), resuming from /var/lib/gpuguard/snapshots/yolo/20261127T075615Z-000002-8a9a8116.pt",
          data={"resume_from": "/var/lib/gpuguard/snapshots/yolo/20261127T075615Z-000002-8a9a8116.pt", "attempt": 2}),
    Event(kind="gpu_reset", severity=Severity.INFO, gpu=GPU,
          message="GPU 0 reset succeeded: GPU 00000000:18:00.0 was successfully reset.",
          data={"ok": True, "by": "gpuguard (job yolo)", "argv": ["nvidia-smi", "--gpu-reset", "-i", GPU]}),
    Event(kind="gpu_included", severity=Severity.INFO, gpu=GPU,
          message="GPU 0 returned to service by gpuguard: healthy for 60s after its reset"),
]
# faults per day on one node: a quiet node, one flaky GPU, a GPU failing over and over
RATES = {"quiet (1 fault a week)": 1 / 7, "realistic (1 fault a day)": 1.0, "bad (1 fault an hour)": 24.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--write-docs", action="store_true", help="replace the table in docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gg-store-") as tmp:
        path = Path(tmp) / "gpuguard.db"
        store = EventStore(path)
        empty = store.size_bytes()
        started = time.perf_counter()
        for i in range(args.events):
            store.append(FAULT[i % len(FAULT)])
        append_ms = 1000 * (time.perf_counter() - started) / args.events
        store.close()
        with sqlite3.connect(path) as db:  # fold the WAL in, as the daemon's checkpoints do
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = path.stat().st_size
    per_event = (size - empty) / args.events
    per_fault = per_event * len(FAULT)
    limits = DaemonConfig()
    cap = per_event * limits.event_retention_max_rows
    lines = [
        f"| fault rate | events a day | growth a day | days to the row cap ({limits.event_retention_max_rows:,} events) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, faults_per_day in RATES.items():
        events = faults_per_day * len(FAULT)
        lines.append(
            f"| {name} | {events:.1f} | {events * per_event / 1024:.1f} KiB | "
            f"{limits.event_retention_max_rows / events:,.0f} |"
        )
    lines.append(
        f"\n{args.events:,} events appended ({len(FAULT)} per fault): {per_event:.0f} bytes each on disk "
        f"({per_fault / 1024:.1f} KiB per fault), {append_ms:.2f} ms per append; the row cap bounds the "
        f"database at about {cap / 2**20:.0f} MiB whatever the rate, and events older than "
        f"{limits.event_retention_days:g} days go first. Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."
    )
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        replace_block("store-growth", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
