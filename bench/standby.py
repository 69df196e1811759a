"""Warm standby: time from a GPU fault to the resumed attempt's first batch, side by side.

The training and the counting are bench/resume.py's (imported from there):
yolov8n, 96 train images at 64 px, batch 8, 3 epochs on the CPU, a fault on
the job's GPU after batch 6 of epoch 2 (the trainer held there until the
fault is in place). Four set-ups, interleaved run by run:

- gpuguard + standby: `gpuguardctl run --standby`; the fault is injected once
  the standby has logged that it is ready (it starts at the attempt's first
  heartbeat, so it is ready long before epoch 2 here). Xid 48 (a double-bit
  ECC error: the GPU must be reset, but still runs the trainer's calls), so
  the trainer answers: it ends its batch, saves and exits 75;
- gpuguard + standby, stuck trainer: the same, but the GPU dies under the
  trainer: its main thread blocks for good at the fault batch (in a call that
  releases the GIL, as a CUDA call on a GPU that is gone does), then Xid 79
  (fallen off the bus) is injected; gpuguard's fault note says the GPU is
  gone, so the rescue thread writes the last step's state at once;
- gpuguard: the answering job without a standby (Xid 48);
- retry loop: bench/baseline's loop, the trainer SIGKILLed at the fault.

Also measured, per standby run: the standby's resident memory (its wrapper
and trainer process, while it waits) and the CPU time it took to get ready,
and for every gpuguard run the running attempt's epoch 1 (first batch of
epoch 1 to first batch of epoch 2, with validation and the save): what a
standby costs when no fault ever comes.

Usage: python bench/standby.py [--runs 3] [--write-docs]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from docblock import replace_block  # noqa: E402
from resume import BIN, Gpuguard, Result, footer, one_run, read_batches, spread, wait  # noqa: E402

from gpuguard.config import JobsConfig  # noqa: E402
from gpuguard.control.client import request  # noqa: E402
from gpuguard.integrations.standby import READY  # noqa: E402

SETUPS = {
    "standby": "gpuguard + standby (Xid 48, trainer answers)",
    "standby-stuck": "gpuguard + standby (Xid 79, trainer stuck)",
    "gpuguard": "gpuguard, no standby (Xid 48)",
    "baseline": "retry loop (SIGKILL at the fault)",
}
ANSWERED_XID, GONE_XID = 48, 79


@dataclass
class Run:
    result: Result
    epoch1_s: float | None = None  # the running attempt's first epoch
    rss_mb: float | None = None  # the waiting standby's processes
    ready_cpu_s: float | None = None  # CPU time the standby took until it waited


def epoch1(log: Path) -> float | None:
    """First batch of epoch 1 to first batch of epoch 2, in the first process."""
    rows = read_batches(log)
    if not rows:
        return None
    starts = {e: t for t, pid, e, b in rows if pid == rows[0][1] and b == 1}
    return starts[2] - starts[1] if 1 in starts and 2 in starts else None


class Standby:
    """Called at the fault batch: wait until the standby is ready, then read its cost."""

    def __init__(self, run: Path, socket: Path) -> None:
        self.log = run / "state" / "jobs" / "yolo" / "output.log"
        self.socket = socket
        self.rss_mb: float | None = None
        self.cpu_s: float | None = None

    def __call__(self) -> None:
        wait(lambda: self.log.exists() and READY in self.log.read_text(errors="replace"), "the standby ready", 120)
        job = next(j for j in request(self.socket, "status", {})["jobs"] if j["name"] == "yolo")
        procs = [psutil.Process(job["standby"]["pid"])]
        procs += procs[0].children(recursive=True)
        self.rss_mb = sum(p.memory_info().rss for p in procs) / 2**20
        self.cpu_s = sum(sum(p.cpu_times()[:2]) for p in procs)


def gpuguard_run(tmp: Path, data: Path, n: int, setup: str) -> Run:
    run = tmp / f"{setup}-{n}"
    run.mkdir()
    gg = Gpuguard(run, data)
    standby, stuck = setup.startswith("standby"), setup.endswith("-stuck")
    watch = Standby(run, gg.socket) if standby else None
    try:
        result = gg.measure(
            False, flags=("--standby",) if standby else (), before_fault=watch,
            xid=GONE_XID if stuck else ANSWERED_XID, stuck=stuck,
        )  # fmt: skip
    finally:
        gg.close()
    return Run(result, epoch1(run / "batches.log"), watch.rss_mb if watch else None, watch.cpu_s if watch else None)


def row(name: str, runs: dict[str, list[Run]], value: Callable[[Run], float | None], fmt: str = ".2f") -> str:
    """One line of the table: value's median (min..max) per set-up, "—" where it has none."""
    cells = []
    for setup in runs:
        values = [float(v) for r in runs[setup] if (v := value(r)) is not None]
        cells.append(spread(values, fmt=fmt) if values else "—")
    return f"| {name} | " + " | ".join(cells) + " |"


def table(runs: dict[str, list[Run]]) -> str:
    lines = ["| median (min..max) | " + " | ".join(SETUPS[s] for s in runs) + " |", "| --- |" + " ---: |" * len(runs)]
    lines.append(row("**fault to first batch of the resumed attempt (s)**", runs, lambda r: r.result.phases.get("total")))
    for phase in ("detect", "checkpoint + stop", "restart", "trainer start-up"):
        lines.append(row(f"  {phase} (s)", runs, lambda r, p=phase: r.result.phases.get(p)))
    lines.append(row("lost work (batches trained again)", runs, lambda r: None if r.result.lost is None else float(r.result.lost), ".0f"))
    lines.append(row("running attempt's epoch 1 (s)", runs, lambda r: r.epoch1_s))
    lines.append(row("standby resident memory, waiting (MB)", runs, lambda r: r.rss_mb, ".0f"))
    lines.append(row("standby CPU time until ready (s)", runs, lambda r: r.ready_cpu_s))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    parser.add_argument("--write-docs", action="store_true", help="replace the standby table in docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    started = time.monotonic()
    runs: dict[str, list[Run]] = {s: [] for s in args.setups}
    with tempfile.TemporaryDirectory(prefix="gpuguard-standby-") as name:
        tmp = Path(name)
        subprocess.run([str(BIN / "gpuguard-yolo"), "make-dataset", str(tmp / "data"), "--train", "96"],
                       check=True, capture_output=True)  # fmt: skip
        data = tmp / "data" / "data.yaml"
        for n in range(args.runs):  # interleaved, so a busy spell of the machine hits every set-up
            for setup in args.setups:
                if setup == "baseline":
                    outcome = one_run("baseline", tmp, data, n)
                    assert isinstance(outcome, Result)
                    done = Run(outcome)
                else:
                    done = gpuguard_run(tmp, data, n, setup)
                runs[setup].append(done)
                print(f"run {n + 1} {setup}: total {done.result.phases.get('total')}, rss {done.rss_mb}", file=sys.stderr, flush=True)
    available = psutil.virtual_memory().available / 2**20
    text = table(runs) + "\n" + footer(args, started).replace(
        "; load average", f"; {available:.0f} MB available at the end ([jobs] standby_min_free_mb "
        f"{JobsConfig().standby_min_free_mb}); load average", 1
    )
    print(text)
    if args.write_docs:
        replace_block("standby", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
