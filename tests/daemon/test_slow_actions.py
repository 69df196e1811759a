"""Slow actions never stall the main loop: a real gpuguardd whose reset command
takes 6 s keeps pinging systemd's watchdog and answering the socket."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import DaemonProc, wait_until

RESET_S = 6.0
WATCHDOG_WINDOW_S = 2.0  # WATCHDOG_USEC=2000000: systemd would kill after 2 s without a ping


class _Pings:
    """Every datagram the daemon sends to $NOTIFY_SOCKET, with when it came."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.seen: list[tuple[float, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.seen.append((time.monotonic(), self.sock.recv(4096)))
            except TimeoutError:
                continue

    def watchdog_between(self, start: float, end: float) -> list[float]:
        return [t for t, data in list(self.seen) if start <= t <= end and data == b"WATCHDOG=1"]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@pytest.fixture
def pings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Pings]:
    """A datagram socket the daemon notifies, with the watchdog on (2 s)."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(0.1)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", str(int(WATCHDOG_WINDOW_S * 1e6)))
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        reader = _Pings(sock)
        try:
            yield reader
        finally:
            reader.close()


def test_a_slow_reset_leaves_the_loop_ticking(tmp_path: Path, pings: _Pings) -> None:
    daemon = DaemonProc(tmp_path, extra_config=f'[reset]\ncommand = ["sleep", "{RESET_S:g}"]\ntimeout_s = 30\n')
    daemon.start()
    try:
        outcome: list[subprocess.CompletedProcess[str]] = []
        resetter = threading.Thread(
            target=lambda: outcome.append(daemon.ctl("reset", "1", check=False, timeout=30)), daemon=True
        )
        resetter.start()
        wait_until(lambda: daemon.gpu(1)["state"] == "resetting", 5.0, "GPU 1 resetting")
        began = time.monotonic()
        surely_resetting = began + RESET_S - 2.0  # the command started at most a status call before `began`
        answered = 0
        while resetter.is_alive() and time.monotonic() - began < RESET_S + 10:
            asked = time.monotonic()
            status = json.loads(daemon.ctl("status", "--json", timeout=5).stdout)
            assert time.monotonic() - asked < 2.0, "status was slow during the reset"
            if time.monotonic() < surely_resetting:
                assert [g["state"] for g in status["gpus"]] == ["healthy", "resetting"]
                answered += 1
            time.sleep(0.3)
        ended = time.monotonic()
        resetter.join(timeout=30)

        assert ended - began >= RESET_S - 1.5 and answered >= 3, "the reset ended too early to test anything"
        assert outcome and outcome[0].returncode == 0, outcome[0].stderr if outcome else "no reply"
        beats = [began, *pings.watchdog_between(began, ended), ended]
        gaps = [b - a for a, b in zip(beats, beats[1:])]
        assert max(gaps) < WATCHDOG_WINDOW_S, f"no WATCHDOG=1 for {max(gaps):.1f} s during the reset"

        events = json.loads(daemon.ctl("events", "--json", "--gpu", "1").stdout)
        resets = [e for e in events if e["kind"] == "gpu_reset"]
        assert len(resets) == 1 and resets[0]["ok"] is True
        assert "succeeded" in resets[0]["message"]
        after = time.time()
        daemon.wait_for(
            lambda s: s["gpus"][1]["state"] == "healthy" and s["daemon"]["last_poll_at"] > after,
            what="polls again after the reset",
        )
    finally:
        daemon.stop()
