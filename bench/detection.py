"""Detection latency: from a fault to the event stored and the alert logged.

Runs the real Daemon in-process on simulated GPUs (its main loop on a
thread, 1 s polling, as deployed) and measures three sources:

- kernel log: a genuine `NVRM: Xid` record appended to the kernel-log file
  the daemon follows;
- NVML event: an Xid event queued where nvmlEventSetWait returns it;
- polled counter: a row remap goes pending, seen at the next poll.

Latency = time from the fault to `Daemon.record()` returning for its event
(the event is then in SQLite and logged). Prints p50/p99/max per source.

Usage: python bench/detection.py [--samples 50] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from docblock import replace_block  # noqa: E402
from gpuguard import logs  # noqa: E402
from gpuguard.config import Config, DaemonConfig, MonitorConfig  # noqa: E402
from gpuguard.daemon.service import Daemon  # noqa: E402
from gpuguard.events import Event  # noqa: E402
from gpuguard.nvml.types import NvmlEvent  # noqa: E402
from gpuguard.sim.backend import SimulatedBackend  # noqa: E402
from gpuguard.store import EventStore  # noqa: E402

# restart-the-app Xids: they leave the GPU usable, so samples do not disturb each other
CODES = (13, 31, 43, 69, 94, 8, 11, 25, 26, 27, 36, 37, 38, 42, 45, 60)


class Recorder:
    """Wraps Daemon.record to note when each event was stored."""

    def __init__(self, daemon: Daemon) -> None:
        self.cond = threading.Condition()
        self.seen: list[tuple[float, Event]] = []
        original = daemon.record

        def record(event: Event) -> Event:
            stored = original(event)
            with self.cond:
                self.seen.append((time.monotonic(), event))
                self.cond.notify_all()
            return stored

        daemon.record = record  # type: ignore[method-assign]

    def wait(self, match: Any, since: int, timeout_s: float = 5.0) -> float | None:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while True:
                for t, ev in self.seen[since:]:
                    if match(ev):
                        return t
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)


def kmsg_line(seq: int, pci: str, code: int) -> str:
    usec = int(time.monotonic() * 1e6)
    return f"3,{seq},{usec},-;NVRM: Xid (PCI:{pci}): {code}, pid=4242, name=bench, benchmark fault\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--write-docs", action="store_true", help="replace the table in docs/BENCHMARKS.md")
    args = parser.parse_args()
    # the alert still goes through record() and the log chain; keep the console clean
    logs.configure("critical", "json", stream=open(os.devnull, "w"))  # noqa: SIM115

    with tempfile.TemporaryDirectory(prefix="gg-bench-") as tmp_name:
        tmp = Path(tmp_name)
        kmsg = tmp / "kmsg"
        kmsg.write_text("")
        config = Config(
            daemon=DaemonConfig(state_dir=tmp / "state", socket=tmp / "run" / "s.sock"),
            monitor=MonitorConfig(poll_interval_s=1.0, kernel_log=kmsg),
        )
        (tmp / "state").mkdir()
        (tmp / "run").mkdir()
        backend = SimulatedBackend(args.gpus, tmp / "sim-kmsg")
        daemon = Daemon(config, backend, EventStore(tmp / "state" / "db"), kmsg)
        daemon.start()
        recorder = Recorder(daemon)
        loop = threading.Thread(target=daemon.run, daemon=True)
        loop.start()
        time.sleep(1.5)
        inventory = daemon.inventory
        results: dict[str, list[float]] = {"kernel log": [], "NVML event": [], "polled counter": []}

        seq = 1
        for i in range(args.samples):
            gpu = inventory[i % len(inventory)]
            code = CODES[(i // len(inventory)) % len(CODES)]
            pci = gpu.pci_bus_id[4:].lower()[:10]  # 00000000:18:00.0 -> 0000:18:00
            since = len(recorder.seen)
            t0 = time.monotonic()
            with kmsg.open("a") as f:
                f.write(kmsg_line(seq, pci, code))
            seq += 1
            t = recorder.wait(lambda e, u=gpu.uuid, c=code: e.kind == "xid" and e.gpu == u and e.xid == c, since)
            if t is not None:
                results["kernel log"].append(t - t0)
            time.sleep(0.05)

        time.sleep(2.5)  # past the same-Xid dedup window
        for i in range(args.samples):
            gpu = inventory[i % len(inventory)]
            code = CODES[(i // len(inventory) + 7) % len(CODES)]
            since = len(recorder.seen)
            t0 = time.monotonic()
            backend._queue_event(NvmlEvent(gpu.uuid, "xid", code, time.time()))  # noqa: SLF001
            t = recorder.wait(lambda e, u=gpu.uuid, c=code: e.kind == "xid" and e.gpu == u and e.xid == c, since)
            if t is not None:
                results["NVML event"].append(t - t0)
            time.sleep(0.05)

        for i in range(min(args.samples, 20)):
            gpu = inventory[i % len(inventory)]
            backend.reset(gpu.index)
            time.sleep(1.0 + random.random())  # land anywhere in the poll cycle
            since = len(recorder.seen)
            t0 = time.monotonic()
            backend.inject(gpu.index, "remap-pending")
            t = recorder.wait(lambda e, u=gpu.uuid: e.kind == "remap" and e.gpu == u, since, timeout_s=5)
            if t is not None:
                results["polled counter"].append(t - t0)

        daemon.stop()
        loop.join(5)
        daemon.close()

    rows = []
    lines = ["| source | samples | p50 ms | p99 ms | max ms |", "| --- | --- | --- | --- | --- |"]
    for name, values in results.items():
        if not values:
            lines.append(f"| {name} | 0 | - | - | - |")
            continue
        ms = sorted(1000 * v for v in values)
        p99 = ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))]
        row = {"source": name, "samples": len(ms), "p50_ms": round(statistics.median(ms), 1), "p99_ms": round(p99, 1), "max_ms": round(ms[-1], 1)}
        rows.append(row)
        lines.append(f"| {name} | {row['samples']} | {row['p50_ms']} | {row['p99_ms']} | {row['max_ms']} |")
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    lines.append(f"\nMeasured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs; {args.gpus} simulated GPUs; load average after the run {load}.")
    text = "\n".join(lines)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.write_docs:
        replace_block("detection", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
