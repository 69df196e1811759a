"""Shared checkpoint storage: upload time, and the load an upload adds beside a trainer.

For a 30 MB and a 300 MB checkpoint (random bytes: nothing compresses), against
SeaweedFS's S3 on loopback (lab/s3.py) and a file:// store on a local
directory, this runs gpuguard's own uploader (`Uploader.offer`, then
`wait_stored`: list, put, list and prune, as the daemon does) while a
trainer-like process spins a Python loop beside it. It reports the upload's
wall time and throughput, the CPU time the uploading process spent (the
daemon's cost), the S3 server's CPU time, and the trainer's loop rate during
the upload relative to its rate alone. The median of --runs runs per case.

Usage: python bench/storage.py [--runs 3] [--write-docs]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil  # noqa: E402

from docblock import replace_block  # noqa: E402
from gpuguard.storage.build import open_store  # noqa: E402
from gpuguard.storage.uploader import Uploader  # noqa: E402
from lab.s3 import SeaweedS3  # noqa: E402

SIZES_MB = (30, 300)
# a trainer's host side: a Python loop that reports its iteration count every 50 ms
SPIN = """
import sys, time
n, last = 0, time.monotonic()
while True:
    for _ in range(20000):
        n += 1
    now = time.monotonic()
    if now - last >= 0.05:
        print(now, n, flush=True)
        last = now
"""


class Trainer:
    """The busy process; its rate over any window of the shared monotonic clock."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.PIPE, text=True)
        self.samples: list[tuple[float, int]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.split()
            if len(parts) == 2:  # not a line cut off by the kill at the end
                self.samples.append((float(parts[0]), int(parts[1])))

    def rate(self, start: float, end: float) -> float:
        inside = [(t, n) for t, n in list(self.samples) if start <= t <= end]
        if len(inside) < 2:
            return float("nan")
        (t0, n0), (t1, n1) = inside[0], inside[-1]
        return (n1 - n0) / (t1 - t0)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def checkpoint(path: Path, mb: int) -> None:
    with path.open("wb") as f:
        for _ in range(mb):
            f.write(os.urandom(1024 * 1024))


def one_run(url: str, src: Path, sha: str, n: int, server: psutil.Process | None) -> dict[str, float]:
    store = open_store(url)
    for old in store.list("bench"):  # same content is never uploaded twice: start from an empty store
        store.delete("bench", old.id)
    up = Uploader(store, lambda e: e, keep_newest=2, fetch_timeout_s=60.0)
    up.start()
    trainer = Trainer()
    try:
        time.sleep(1.0)  # the trainer warms up
        before = time.monotonic()
        time.sleep(1.5)
        alone = trainer.rate(before, time.monotonic())
        cpu0 = _cpu_self()
        server0 = _cpu(server)
        t0 = time.monotonic()
        snap_id = f"20261130T1200{n % 60:02d}Z-{n:06d}-{n:08x}"
        up.offer("bench", snap_id, src, sha, time.time())
        if not up.wait_stored("bench", snap_id, 600.0):
            raise RuntimeError(f"upload to {url} did not finish: {up.describe()}")
        t1 = time.monotonic()
        time.sleep(1.6)  # the trainer alone again: the mean of before and after evens out drift
        beside = trainer.rate(t0, t1)
        alone = (alone + trainer.rate(t1 + 0.1, time.monotonic())) / 2
        return {
            "seconds": t1 - t0,
            "cpu_s": _cpu_self() - cpu0,
            "server_cpu_s": _cpu(server) - server0,
            "trainer_pct": 100.0 * beside / alone,
        }
    finally:
        trainer.stop()
        up.close()


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        t = p.cpu_times()
        total += t.user + t.system
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    rows: list[list[Any]] = []
    with tempfile.TemporaryDirectory(prefix="gpuguard-bench-storage-") as tmp_text:
        tmp = Path(tmp_text)
        s3 = SeaweedS3(tmp / "s3")
        s3.start()
        try:
            s3.make_bucket("bench")
            os.environ.update(s3.env())
            shared = tmp / "shared"
            shared.mkdir()
            stores = [("SeaweedFS S3 (loopback)", "s3://bench/ckpt", psutil.Process(s3.proc.pid) if s3.proc else None),
                      ("file:// (local disk)", f"file://{shared}", None)]  # fmt: skip
            n = 0
            for mb in SIZES_MB:
                src = tmp / f"ckpt-{mb}.pt"
                checkpoint(src, mb)
                sha = hashlib.sha256(src.read_bytes()).hexdigest()
                for name, url, server in stores:
                    runs = []
                    for _ in range(args.runs):
                        n += 1
                        runs.append(one_run(url, src, sha, n, server))
                    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                    row = [name, f"{mb} MB", f"{med['seconds']:.2f} s", f"{mb / med['seconds']:.0f} MB/s",
                           f"{med['cpu_s']:.2f} s", f"{med['server_cpu_s']:.2f} s" if server else "-",
                           f"{med['trainer_pct']:.0f} %" if math.isfinite(med["trainer_pct"]) else "— (too short to sample)"]  # fmt: skip
                    print(" | ".join(row), flush=True)
                    rows.append(row)
                src.unlink()
        finally:
            s3.stop()
    head = ["store", "checkpoint", "upload", "throughput", "uploader CPU", "S3 server CPU", "trainer loop rate during upload"]
    table = "\n".join(
        ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    )
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    note = (
        f"\n\nMedian of {args.runs} runs each. Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{psutil.cpu_count()} CPUs, Python {sys.version.split()[0]}; load average at the end {load}; "
        "`python bench/storage.py --write-docs`."
    )
    print(table + note)
    if args.write_docs:
        replace_block("storage", table + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
