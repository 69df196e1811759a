"""sd_notify against a socket the test binds, and the real daemon talking to it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import BIN
from gpuguard import sdnotify


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket at a tmp path, named by NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5.0)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def test_notify_sends_the_exact_datagram(notify_socket: socket.socket) -> None:
    assert sdnotify.notify("READY=1\nSTATUS=2 GPU(s): 2 healthy")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=2 GPU(s): 2 healthy"
    assert sdnotify.notify("WATCHDOG=1")
    assert notify_socket.recv(4096) == b"WATCHDOG=1"


def test_reloading_carries_the_monotonic_clock_in_microseconds(notify_socket: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading()
    name, _, usec = notify_socket.recv(4096).decode().partition("\nMONOTONIC_USEC=")
    assert name == "RELOADING=1"
    assert before <= int(usec) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"gpuguard-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("STOPPING=1")
        assert sock.recv(4096) == b"STOPPING=1"


def test_notify_without_systemd_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False


@pytest.mark.parametrize("value", ["", "relative/path", "vsock:2:1234"])
def test_notify_ignores_addresses_it_cannot_use(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert sdnotify.notify("READY=1") is False


def test_notify_to_a_missing_socket_fails_quietly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert sdnotify.notify("READY=1") is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("20000000", None, 10.0),
        ("20000000", "self", 10.0),
        ("20000000", "other", None),
        ("3000000", "", 1.5),
        ("soon", None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            value = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(value, value)
            monkeypatch.setenv(name, value)
    assert sdnotify.watchdog_interval_s() == expected


# --- the real daemon ------------------------------------------------------


def _gpuguardd(tmp_path: Path, poll_interval_s: float, env: dict[str, str], out: Any) -> subprocess.Popen[bytes]:
    """`gpuguardd --simulate 1` started by hand, not by harness.running_daemon: these tests read
    its datagrams from the first one on and choose its whole environment."""
    config = tmp_path / "config.toml"
    config.write_text(f"[monitor]\npoll_interval_s = {poll_interval_s}\nnvml_timeout_s = 0.5\n")
    argv = [str(BIN / "gpuguardd"), "--simulate", "1", "--config", str(config),
            "--state-dir", str(tmp_path / "state"), "--socket", str(tmp_path / "gpuguard.sock")]  # fmt: skip
    return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)


def _receive_until(sock: socket.socket, wanted: bytes, deadline: float, seen: list[bytes]) -> None:
    while time.monotonic() < deadline:
        try:
            seen.append(sock.recv(4096))
        except TimeoutError:
            continue
        if seen[-1].startswith(wanted):
            return
    raise AssertionError(f"no {wanted!r} datagram; got {seen[:10]}")


@pytest.mark.e2e
def test_daemon_notifies_ready_watchdog_and_stopping(tmp_path: Path, notify_socket: socket.socket) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_PID", "JOURNAL_STREAM")}
    env.update(NOTIFY_SOCKET=os.environ["NOTIFY_SOCKET"], WATCHDOG_USEC="2000000", PYTHONUNBUFFERED="1")
    log = tmp_path / "daemon.log"
    notify_socket.settimeout(0.2)
    with log.open("wb") as out:
        proc = _gpuguardd(tmp_path, 0.2, env, out)
    try:
        seen: list[bytes] = []
        deadline = time.monotonic() + 20
        _receive_until(notify_socket, b"READY=1", deadline, seen)
        ready = seen[-1].decode()
        assert all(not m.startswith(b"STATUS=") for m in seen[:-1]), "STATUS before READY"
        assert ready.startswith("READY=1\nSTATUS=1 GPU(s): ") and "1 healthy" in ready
        _receive_until(notify_socket, b"WATCHDOG=1", deadline, seen)
        proc.send_signal(signal.SIGTERM)
        _receive_until(notify_socket, b"STOPPING=1", time.monotonic() + 15, seen)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert seen.count(b"STOPPING=1") == 1, log.read_text()


@pytest.mark.e2e
def test_daemon_without_watchdog_env_sends_no_watchdog(tmp_path: Path, notify_socket: socket.socket) -> None:
    """WATCHDOG_PID naming another process means the watchdog is not ours."""
    env = dict(os.environ, WATCHDOG_USEC="2000000", WATCHDOG_PID="1", PYTHONUNBUFFERED="1")
    notify_socket.settimeout(0.2)
    proc = _gpuguardd(tmp_path, 0.1, env, subprocess.DEVNULL)
    try:
        seen: list[bytes] = []
        deadline = time.monotonic() + 20
        _receive_until(notify_socket, b"READY=1", deadline, seen)
        # a few more main-loop ticks
        for _ in range(3):
            _receive_until(notify_socket, b"STATUS=", deadline, seen)
        proc.send_signal(signal.SIGTERM)
        _receive_until(notify_socket, b"STOPPING=1", time.monotonic() + 15, seen)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert b"WATCHDOG=1" not in seen
