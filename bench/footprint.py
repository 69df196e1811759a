"""The daemon's footprint at idle: memory, CPU and the cost of one poll.

For each GPU count, starts the real `gpuguardd --simulate N` (poll every
--poll-interval-s, temp state dir), lets it settle, then samples it for
--sample-s: RSS (and USS where the platform gives it) and CPU in percent of
one core from the process's cpu_times over the window. Separately, in this
process, times the simulated backend's poll() --polls times and divides by N.

Prints a markdown table; --write-docs replaces the table in
docs/BENCHMARKS.md between the footprint markers.

Usage: python bench/footprint.py [--gpus 1 8 16] [--settle-s 10] [--sample-s 60] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from docblock import replace_block  # noqa: E402

from gpuguard.sim.backend import SimulatedBackend  # noqa: E402

DOCS = REPO / "docs" / "BENCHMARKS.md"
MB = 1024 * 1024
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Footprint:
    gpus: int
    rss_mean_mb: float
    rss_max_mb: float
    uss_mb: float | None
    cpu_pct: float  # of one core, over the sampling window
    poll_us_per_gpu: float
    poll_ms_total: float


def start_daemon(gpus: int, tmp: Path, poll_interval_s: float) -> tuple[subprocess.Popen[bytes], Path]:
    """gpuguardd on N simulated GPUs; returns once its control socket is up."""
    config = tmp / "config.toml"
    config.write_text(f"[monitor]\npoll_interval_s = {poll_interval_s}\n")
    sock = tmp / "gpuguard.sock"
    log = tmp / "daemon.log"
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    argv = [
        str(Path(sys.executable).parent / "gpuguardd"),
        "--simulate",
        str(gpus),
        "--config",
        str(config),
        "--state-dir",
        str(tmp / "state"),
        "--socket",
        str(sock),
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"gpuguardd --simulate {gpus} did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.1)
    return proc, log


def sample(proc: psutil.Process, seconds: float) -> tuple[list[int], int | None, float]:
    """RSS once a second, USS at the end, CPU % of one core over the window."""
    rss: list[int] = []
    cpu0, wall0 = proc.cpu_times(), time.monotonic()
    end = wall0 + seconds
    while time.monotonic() < end:
        rss.append(proc.memory_info().rss)
        time.sleep(min(1.0, max(0.0, end - time.monotonic())))
    cpu1, wall1 = proc.cpu_times(), time.monotonic()
    used = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    try:
        uss: int | None = proc.memory_full_info().uss
    except (psutil.AccessDenied, AttributeError):
        uss = None
    return rss, uss, 100.0 * used / (wall1 - wall0)


def time_polls(gpus: int, polls: int, tmp: Path) -> float:
    """Median seconds of one poll() of the simulated backend, after a warm-up."""
    backend = SimulatedBackend(gpus, tmp / "bench-kmsg", timeout_s=2.0)
    backend.open()
    backend.poll()
    times = []
    for _ in range(polls):
        t0 = time.perf_counter()
        backend.poll()
        times.append(time.perf_counter() - t0)
    backend.close()
    return statistics.median(times)


def measure(gpus: int, args: argparse.Namespace) -> Footprint:
    with tempfile.TemporaryDirectory(prefix=f"gpuguard-footprint-{gpus}-") as name:
        tmp = Path(name)
        proc, log = start_daemon(gpus, tmp, args.poll_interval_s)
        try:
            time.sleep(args.settle_s)
            if proc.poll() is not None:
                raise RuntimeError(f"gpuguardd exited {proc.returncode}:\n{log.read_text()[-2000:]}")
            rss, uss, cpu = sample(psutil.Process(proc.pid), args.sample_s)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        poll_s = time_polls(gpus, args.polls, tmp)
    return Footprint(
        gpus=gpus,
        rss_mean_mb=statistics.fmean(rss) / MB,
        rss_max_mb=max(rss) / MB,
        uss_mb=None if uss is None else uss / MB,
        cpu_pct=cpu,
        poll_us_per_gpu=poll_s / gpus * 1e6,
        poll_ms_total=poll_s * 1e3,
    )


def table(rows: list[Footprint], args: argparse.Namespace, load: tuple[float, float, float]) -> str:
    lines = [
        "| GPUs (simulated) | RSS mean (MB) | RSS max (MB) | USS (MB) | CPU (% of one core) "
        "| poll() per GPU (µs) | poll() total (ms) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        uss = "n/a" if r.uss_mb is None else f"{r.uss_mb:.1f}"
        lines.append(
            f"| {r.gpus} | {r.rss_mean_mb:.1f} | {r.rss_max_mb:.1f} | {uss} | {r.cpu_pct:.2f} "
            f"| {r.poll_us_per_gpu:.0f} | {r.poll_ms_total:.2f} |"
        )
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines += [
        "",
        f"Measured {when}; {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.system()} "
        f"{platform.release()}; poll every {args.poll_interval_s:g} s, settle {args.settle_s:g} s, "
        f"sample {args.sample_s:g} s, poll() median of {args.polls}; "
        f"load average before the run {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 16], help="simulated GPU counts")
    parser.add_argument("--poll-interval-s", type=float, default=1.0)
    parser.add_argument("--settle-s", type=float, default=10.0, help="wait after start-up before sampling")
    parser.add_argument("--sample-s", type=float, default=60.0, help="sampling window per GPU count")
    parser.add_argument("--polls", type=int, default=200, help="in-process poll() calls to time")
    parser.add_argument("--write-docs", action="store_true", help=f"replace the table in {DOCS.relative_to(REPO)}")
    args = parser.parse_args(argv)
    load = os.getloadavg()
    rows = []
    for gpus in args.gpus:
        rows.append(measure(gpus, args))
        print(f"measured {gpus} GPU(s)", file=sys.stderr)
    text = table(rows, args, load)
    print(text)
    if args.write_docs:
        replace_block("footprint", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
