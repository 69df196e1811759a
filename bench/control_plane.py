"""Control plane under load: `status` latency with many clients at once.

Starts the real `gpuguardd --simulate 8` (1 s polling) in a temp state dir
and runs rounds of C concurrent clients (threads), each sending R `status`
requests one after another through gpuguard.control.client.request, a new
connection per request as gpuguardctl makes. Per round: p50/p99/max latency
of a request (connect to decoded reply), the throughput (requests / the
round's wall time), and failures (a "busy" reply or no reply). Prints the
median over rounds, with the spread (min..max).

Usage: python bench/control_plane.py [--clients 50] [--requests 20] [--rounds 5] [--write-docs]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from docblock import replace_block  # noqa: E402

from gpuguard.control.client import CommandFailed, DaemonUnreachable, request  # noqa: E402

BIN = Path(sys.executable).parent
DOCS = REPO / "docs" / "BENCHMARKS.md"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def one_round(socket: Path, clients: int, requests: int) -> dict[str, float]:
    """All clients start together (a barrier); returns p50/p99/max in ms, req/s and failures."""
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client() -> None:
        mine, failed = [], 0
        barrier.wait()
        for _ in range(requests):
            t = time.perf_counter()
            try:
                request(socket, "status", {}, timeout_s=30)
                mine.append(time.perf_counter() - t)
            except (CommandFailed, DaemonUnreachable):
                failed += 1
        with lock:
            latencies.extend(mine)
            failures[0] += failed

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {
        "p50": 1000 * percentile(latencies, 50),
        "p99": 1000 * percentile(latencies, 99),
        "max": 1000 * max(latencies),
        "rps": len(latencies) / wall,
        "failed": failures[0],
    }


def measure(clients: int, requests: int, rounds: int) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="gpuguard-cp-") as name:
        tmp = Path(name)
        socket = tmp / "gg.sock"
        config = tmp / "config.toml"
        config.write_text("[monitor]\npoll_interval_s = 1.0\n")
        with (tmp / "gpuguardd.log").open("w") as log:
            daemon = subprocess.Popen(
                [str(BIN / "gpuguardd"), "--simulate", "8", "--config", str(config),
                 "--state-dir", str(tmp / "state"), "--socket", str(socket)],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            try:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        request(socket, "status", {}, timeout_s=2)
                        break
                    except DaemonUnreachable:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
                one_round(socket, clients, 2)  # warm-up, not counted
                return [one_round(socket, clients, requests) for _ in range(rounds)]
            finally:
                daemon.terminate()
                daemon.wait(timeout=30)


def table(rounds: list[dict[str, float]], clients: int, requests: int) -> str:
    def cell(key: str, fmt: str) -> str:
        v = [r[key] for r in rounds]
        return f"{statistics.median(v):{fmt}} ({min(v):{fmt}}..{max(v):{fmt}})"

    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        "| clients at once | requests per round | p50 ms | p99 ms | max ms | requests/s | failed |\n"
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
        f"| {clients} | {clients * requests} | {cell('p50', '.1f')} | {cell('p99', '.1f')} | {cell('max', '.1f')} "
        f"| {cell('rps', '.0f')} | {sum(int(r['failed']) for r in rounds)} |\n\n"
        f"Medians over {len(rounds)} rounds (min..max). Measured {datetime.utcnow():%Y-%m-%d %H:%M} UTC; "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, Linux {platform.release()}; "
        f"`gpuguardd --simulate 8`, poll 1 s; load average at the end {load}.\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=20, help="requests per client per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--write-docs", action="store_true", help=f"replace the table in {DOCS.relative_to(REPO)}")
    args = parser.parse_args(argv)
    text = table(measure(args.clients, args.requests, args.rounds), args.clients, args.requests)
    print(text)
    if args.write_docs:
        replace_block("control-plane", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
