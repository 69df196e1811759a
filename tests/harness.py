"""The tests' one harness: a real gpuguardd on simulated GPUs driven through gpuguardctl,
acting as another user, and the one way to wait for a condition.

Plain helpers, imported as `from harness import ...`; the fixtures built on them are in
tests/conftest.py (pytest hands those to every test by name)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil


BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")

# Acting as another user: the tests run as root, so clients and jobs of an
# unprivileged user run as `nobody`, with an interpreter nobody may execute
# (the venv's may sit under /root) and the repository on PYTHONPATH.
NOBODY = pwd.getpwnam("nobody")
NOBODY_ENV = {"PYTHONPATH": str(REPO), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


def as_nobody(args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, user=NOBODY.pw_uid, group=NOBODY.pw_gid, extra_groups=[], env=NOBODY_ENV, cwd="/",
        capture_output=True, text=True, timeout=30, **kw,
    )  # fmt: skip


def wait_until(probe: Callable[[], T], timeout_s: float, what: str, interval: float = 0.05) -> T:
    """Poll until probe() is truthy; returns its value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval)


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class DaemonProc:
    def __init__(self, tmp: Path, gpus: int = 2, extra_config: str = "") -> None:
        self.tmp = tmp
        self.gpus = gpus
        self.state_dir = tmp / "state"
        self.socket = tmp / "run" / "gpuguard.sock"
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        self.config = tmp / "config.toml"
        self.config.write_text(
            "[daemon]\n"
            'socket_mode = "0666"\n'
            "[monitor]\n"
            "poll_interval_s = 0.2\n"
            "nvml_timeout_s = 0.5\n" + extra_config
        )
        self.log = tmp / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 15.0) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    str(BIN / "gpuguardd"),
                    "--simulate",
                    str(self.gpus),
                    "--config",
                    str(self.config),
                    "--state-dir",
                    str(self.state_dir),
                    "--socket",
                    str(self.socket),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gpuguardd exited {self.proc.returncode}:\n{self.log.read_text()}")
            if self.socket.exists():
                result = self.ctl("status", "--json", check=False)
                if result.returncode == 0 and json.loads(result.stdout)["daemon"]["last_poll_at"]:
                    return
            time.sleep(0.05)
        raise AssertionError(f"gpuguardd did not come up:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def ctl(self, *args: str, check: bool = True, timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(BIN / "gpuguardctl"), "--socket", str(self.socket), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"gpuguardctl {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result

    def status(self) -> dict[str, Any]:
        return json.loads(self.ctl("status", "--json").stdout)

    def gpu(self, index: int) -> dict[str, Any]:
        return next(g for g in self.status()["gpus"] if g["index"] == index)

    def wait_for(self, predicate: Any, timeout_s: float = 5.0, what: str = "condition") -> float:
        """Poll status until predicate(status) holds; returns the seconds it took."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if predicate(self.status()):
                return time.monotonic() - start
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; last status: {json.dumps(self.status(), indent=1)[:3000]}")


