"""SIGHUP under systemd: a real gpuguardd says RELOADING=1 (with MONOTONIC_USEC)
when a reload begins and READY=1 once it is done, as `Type=notify-reload` and
`RELOADING=1` in sd_notify(3) expect, also when the new config is refused."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import DaemonProc, NotifySocket, running_daemon

pytestmark = pytest.mark.e2e


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    path = tmp_path / "notify"
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))  # DaemonProc passes the environment on
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    found = NotifySocket(path)
    yield found
    found.close()


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def reload_and_wait(d: DaemonProc, listener: NotifySocket) -> tuple[str, int, int]:
    """SIGHUP; the RELOADING=1 datagram, its index and READY=1's index."""
    assert d.proc is not None
    start = len(listener.seen)
    d.proc.send_signal(signal.SIGHUP)
    reloading = listener.after(start, "RELOADING=1")
    ready = listener.after(reloading, "READY=1")
    return listener.seen[reloading], reloading, ready


def test_sighup_sends_reloading_then_ready(tmp_path: Path, listener: NotifySocket) -> None:
    with running_daemon(tmp_path) as d:
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
        assert d.stop() == 0
