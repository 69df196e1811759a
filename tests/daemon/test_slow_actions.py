"""Slow actions never stall the main loop: a real gpuguardd whose reset command
takes 6 s keeps pinging systemd's watchdog and answering the socket."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import NotifySocket, running_daemon, wait_until
from gpuguard.control.client import request

pytestmark = pytest.mark.e2e

RESET_S = 6.0
WATCHDOG_WINDOW_S = 2.0  # WATCHDOG_USEC=2000000: systemd would kill after 2 s without a ping


@pytest.fixture
def pings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    """A datagram socket the daemon notifies, with the watchdog on (2 s)."""
    path = tmp_path / "notify"
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", str(int(WATCHDOG_WINDOW_S * 1e6)))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    reader = NotifySocket(path)
    try:
        yield reader
    finally:
        reader.close()


def test_a_slow_reset_leaves_the_loop_ticking(tmp_path: Path, pings: NotifySocket) -> None:
    with running_daemon(tmp_path, extra_config=f'[reset]\ncommand = ["sleep", "{RESET_S:g}"]\ntimeout_s = 30\n') as daemon:
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
            status = request(daemon.socket, "status", {}, timeout_s=5)  # in this process: no CLI start-up measured
            assert time.monotonic() - asked < 2.0, "status was slow during the reset"
            if time.monotonic() < surely_resetting:
                assert [g["state"] for g in status["gpus"]] == ["healthy", "resetting"]
                answered += 1
            time.sleep(0.3)
        ended = time.monotonic()
        resetter.join(timeout=30)

        assert ended - began >= RESET_S - 1.5 and answered >= 3, "the reset ended too early to test anything"
        assert outcome and outcome[0].returncode == 0, outcome[0].stderr if outcome else "no reply"
        beats = [began, *pings.between(began, ended, "WATCHDOG=1"), ended]
        gaps = [b - a for a, b in zip(beats, beats[1:])]
        assert max(gaps) < WATCHDOG_WINDOW_S, f"no WATCHDOG=1 for {max(gaps):.1f} s during the reset"

        resets = daemon.events("gpu_reset", gpu="1")
        assert len(resets) == 1 and resets[0]["ok"] is True
        assert "succeeded" in resets[0]["message"]
        after = time.time()
        daemon.wait_for(
            lambda s: s["gpus"][1]["state"] == "healthy" and s["daemon"]["last_poll_at"] > after,
            what="polls again after the reset",
        )
