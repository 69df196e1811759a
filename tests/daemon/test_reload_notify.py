"""SIGHUP under systemd: a real gpuguardd says RELOADING=1 (with MONOTONIC_USEC)
when a reload begins and READY=1 once it is done, as `Type=notify-reload` and
`RELOADING=1` in sd_notify(3) expect, also when the new config is refused."""

from __future__ import annotations

import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import DaemonProc, wait_until


class Listener:
    """Every datagram sent to a NOTIFY_SOCKET the test binds, read on a thread
    (a full socket queue would block the daemon's main loop)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.seen: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.seen.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def after(self, start: int, prefix: str, timeout_s: float = 15.0) -> int:
        """The index of the first datagram from `start` on that starts with `prefix`."""
        return wait_until(
            lambda: next((i + 1 for i, m in enumerate(self.seen[start:], start) if m.startswith(prefix)), 0),
            timeout_s,
            f"{prefix!r} after datagram {start}; got {self.seen[start:][:10]}",
        ) - 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    path = tmp_path / "notify"
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))  # DaemonProc passes the environment on
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    found = Listener(path)
    yield found
    found.close()


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def reload_and_wait(d: DaemonProc, listener: Listener) -> tuple[str, int, int]:
    """SIGHUP; the RELOADING=1 datagram, its index and READY=1's index."""
    assert d.proc is not None
    start = len(listener.seen)
    d.proc.send_signal(signal.SIGHUP)
    reloading = listener.after(start, "RELOADING=1")
    ready = listener.after(reloading, "READY=1")
    return listener.seen[reloading], reloading, ready


def test_sighup_sends_reloading_then_ready(tmp_path: Path, listener: Listener) -> None:
    d = DaemonProc(tmp_path)
    d.start()
    try:
        started = listener.after(0, "READY=1")
        assert not any(m.startswith("RELOADING=1") for m in listener.seen[:started])

        d.config.write_text(d.config.read_text().replace("poll_interval_s = 0.2", "poll_interval_s = 0.3"))
        before = monotonic_usec()
        message, reloading, ready = reload_and_wait(d, listener)
        found = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)", message)
        assert found, message
        assert before <= int(found.group(1)) <= monotonic_usec(), "CLOCK_MONOTONIC, in microseconds"
        assert reloading < ready
        assert listener.seen[ready] == "READY=1"
        # READY=1 came once the reload was done, not when the signal arrived
        assert "config_reloaded" in d.log.read_text()
        assert d.status()["daemon"]["poll_interval_s"] == 0.3

        d.config.write_text("[monitor]\npoll_interval_s = -1\n")  # refused: the daemon keeps its config
        _, reloading, ready = reload_and_wait(d, listener)
        assert reloading < ready and "config_reload_failed" in d.log.read_text()
        assert d.status()["daemon"]["poll_interval_s"] == 0.3
        assert d.proc is not None and d.proc.poll() is None
    finally:
        assert d.stop() == 0
