"""Load: 50 clients hammer `status` and `events` over a real daemon's socket
while faults are injected, and stalled clients hold connections open; every
request answers, and a stalled client never holds up the others."""

from __future__ import annotations

import random
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from harness import DaemonProc, running_daemon
from gpuguard.control.client import request

pytestmark = pytest.mark.e2e

CLIENTS = 50
DURATION_S = 5.0
STALLED = 5
FAULTS = [("xid", "13"), ("xid", "79"), ("xid", "95"), ("ecc-sbe", "500"), ("nvml-hang", "1.5")]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    with running_daemon(tmp_path_factory.mktemp("load"), gpus=4) as d:
        yield d


def stalled_client(path: Path) -> socket.socket:
    """Connects, sends half a request line, and then says nothing."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(str(path))
    conn.sendall(b'{"v": 1, "cmd": "sta')
    return conn


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    with capsys.disabled():
        print(f"\n{line}")


def test_a_stalled_client_does_not_block_others(daemon: DaemonProc, capsys: pytest.CaptureFixture[str]) -> None:
    with ExitStack() as stack:
        for _ in range(STALLED):
            stack.enter_context(stalled_client(daemon.socket))
        latencies = []
        for _ in range(20):
            start = time.monotonic()
            assert request(daemon.socket, "status", {}, timeout_s=5)["gpus"]
            latencies.append(time.monotonic() - start)
    report(capsys, f"with {STALLED} stalled clients: status max {max(latencies) * 1000:.1f} ms over 20 requests")
    assert max(latencies) < 1.0


def test_fifty_clients_under_fault_injection(daemon: DaemonProc, capsys: pytest.CaptureFixture[str]) -> None:
    stop = threading.Event()
    lock = threading.Lock()
    latencies: dict[str, list[float]] = {"status": [], "events": []}
    failures: list[str] = []
    injected: list[str] = []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            cmd, args = ("status", {}) if rng.random() < 0.7 else ("events", {"limit": 200})
            start = time.monotonic()
            try:
                result = request(daemon.socket, cmd, args, timeout_s=10)
                ok = len(result["gpus"]) == 4 if cmd == "status" else isinstance(result, list)
            except Exception as exc:  # any failure at all is counted, none is expected
                ok, result = False, f"{type(exc).__name__}: {exc}"
            elapsed = time.monotonic() - start
            with lock:
                (latencies[cmd] if ok else failures).append(elapsed if ok else f"{cmd}: {result}")

    def injector() -> None:
        rng = random.Random(9)
        while not stop.wait(0.25):
            gpu = str(rng.randrange(4))
            fault, value = rng.choice(FAULTS)
            try:
                request(daemon.socket, "inject", {"gpu": gpu, "fault": fault, "value": value})
                injected.append(f"{fault} {value}")
                if rng.random() < 0.3:
                    request(daemon.socket, "include", {"gpu": str(rng.randrange(4))})
            except Exception as exc:  # a thread's exception would vanish: keep it for the assert
                with lock:
                    failures.append(f"inject {fault} {value} on GPU {gpu}: {type(exc).__name__}: {exc}")

    with ExitStack() as stack:
        for _ in range(STALLED):
            stack.enter_context(stalled_client(daemon.socket))
        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        threads.append(threading.Thread(target=injector))
        for t in threads:
            t.start()
        time.sleep(DURATION_S)
        stop.set()
        for t in threads:
            t.join(timeout=15)
        assert not [t.name for t in threads if t.is_alive()], "a client or the injector never returned"
    every = sorted(latencies["status"] + latencies["events"])
    p99 = every[int(len(every) * 0.99) - 1] if every else float("nan")
    report(
        capsys,
        f"load: {CLIENTS} clients, {DURATION_S:.0f} s, {len(injected)} faults injected: "
        f"{len(latencies['status'])} status + {len(latencies['events'])} events answered, {len(failures)} failed; "
        f"latency p50 {statistics.median(every) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {every[-1] * 1000:.1f} ms",
    )
    assert failures == []
    assert len(latencies["status"]) >= CLIENTS and injected
    assert daemon.proc is not None and daemon.proc.poll() is None
    kinds = {e["kind"] for e in request(daemon.socket, "events", {"limit": 2000})}
    assert {"xid", "nvml_timeout"} <= kinds, kinds
