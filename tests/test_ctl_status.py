"""Issue #17 item 1 (c), through the real `gpuguardctl` against a real
`gpuguardd --simulate 2`: the status table fits 80 columns (full UUIDs only
with --wide), reasons read as sentences with the internals left to --json,
and colour shows on a terminal (a pty) only, never with NO_COLOR or --no-color."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

from harness import BIN, DaemonProc

pytestmark = pytest.mark.e2e

ANSI = re.compile(r"\x1b\[[0-9;]*m")
LONG_NAME = "a-training-run-with-a-name-as-long-as-the-contract-allows-64-chr"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "COLUMNS", "LINES")}
    return env | {"TERM": "xterm-256color"} | extra


def on_terminal(d: DaemonProc, *args: str, columns: int = 80, **env: str) -> str:
    """gpuguardctl's output on a terminal `columns` wide (a pty), newlines as '\\n'."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(
        [str(BIN / "gpuguardctl"), "--socket", str(d.socket), *args],
        stdin=slave, stdout=slave, stderr=slave, env=_env(**env), close_fds=True,
    )  # fmt: skip
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 0.5)[0]:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child's side is closed
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
        assert proc.wait(timeout=10) == 0, out
    return out.decode().replace("\r\n", "\n")


def piped(d: DaemonProc, *args: str, **env: str) -> str:
    done = subprocess.run(
        [str(BIN / "gpuguardctl"), "--socket", str(d.socket), *args],
        capture_output=True, text=True, timeout=30, env=_env(**env),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def _widest(text: str) -> int:
    return max(len(ANSI.sub("", line)) for line in text.splitlines())


def _faults_and_a_long_job(d: DaemonProc, workdir: Path) -> None:
    """GPU 0 off the bus, GPU 1 with two uncorrected ECC errors, and a job
    whose name is too long for 80 columns."""
    d.ctl("inject", "0", "xid", "79")
    d.ctl("inject", "1", "ecc-dbe")
    d.ctl("inject", "1", "ecc-dbe")
    d.ctl("run", "--workdir", str(workdir), "--name", LONG_NAME, "--", "sleep", "60")
    d.wait_for(lambda s: [g["state"] for g in s["gpus"]] == ["faulted", "faulted"], what="both GPUs faulted")


def test_status_fits_80_columns_with_short_uuids_and_sentences(daemon: DaemonProc, tmp_path: Path) -> None:  # noqa: F811
    _faults_and_a_long_job(daemon, tmp_path)
    status = daemon.status()
    uuids = [g["uuid"] for g in status["gpus"]]
    assert "nvmlDevice" in status["gpus"][0]["reason"]  # the daemon's detail, kept in --json
    out = piped(daemon, "status")
    assert _widest(out) <= 80 and "\x1b" not in out
    assert not any(u in out for u in uuids) and all(u[:12] in out for u in uuids)
    assert "nvml" not in out.lower() and "seen in" not in out
    notes = " ".join(out.split())  # the sentences, unwrapped
    assert "GPU 0: The GPU is lost (the driver can no longer reach it); Xid 79 (GPU has fallen off the bus). " \
           "Reboot the node." in notes  # fmt: skip
    assert "2 uncorrected ECC errors since the last reset. Reset the GPU." in notes
    assert "…" in out  # the long job name, cut to fit

    wide = piped(daemon, "status", "--wide")
    assert all(u in wide for u in uuids) and LONG_NAME in wide
    assert _widest(wide) > 80


def test_one_error_is_singular(daemon: DaemonProc) -> None:  # noqa: F811
    daemon.ctl("inject", "1", "ecc-dbe")
    daemon.wait_for(lambda s: s["gpus"][1]["state"] == "faulted", what="GPU 1 faulted")
    notes = " ".join(piped(daemon, "status").split())
    assert "Xid 48 (Double Bit ECC Error); 1 uncorrected ECC error since the last reset. Reset the GPU." in notes
    assert "1 uncorrected ECC errors" not in notes
    daemon.ctl("exclude", "0", "--reason", "fan noise")
    assert "GPU 0: Excluded: fan noise." in piped(daemon, "status")


def test_colour_and_width_on_a_terminal(daemon: DaemonProc, tmp_path: Path) -> None:  # noqa: F811
    daemon.ctl("inject", "0", "thermal", "90")  # degraded
    daemon.ctl("exclude", "1")
    daemon.wait_for(lambda s: s["gpus"][0]["state"] == "degraded", what="GPU 0 degraded")
    out = on_terminal(daemon, "status")
    assert "\x1b[33mdegraded\x1b[0m" in out and "\x1b[31mexcluded\x1b[0m" in out
    assert "\x1b[" not in out.split("\n\n", 1)[1]  # the state cells only: notes, jobs, daemon line are plain
    assert ANSI.sub("", out).splitlines()[0].split() == ["GPU", "UUID", "STATE", "TEMP", "UTIL", "MEM", "JOBS"]
    daemon.ctl("include", "1")
    daemon.ctl("inject", "0", "clear")
    daemon.wait_for(lambda s: s["gpus"][0]["state"] == "healthy", what="GPU 0 healthy")
    assert "\x1b[32mhealthy\x1b[0m" in on_terminal(daemon, "status")
    daemon.ctl("inject", "1", "lost")
    daemon.ctl("inject", "0", "nvml-hang", "30")
    daemon.wait_for(lambda s: s["gpus"][0]["state"] == "unknown", what="GPU 0 unknown")
    out = on_terminal(daemon, "status")
    assert "\x1b[2munknown\x1b[0m" in out and "\x1b[31mfaulted\x1b[0m" in out
    for plain in (on_terminal(daemon, "status", NO_COLOR="1"), on_terminal(daemon, "status", "--no-color"),
                  on_terminal(daemon, "status", TERM="dumb"), piped(daemon, "status")):  # fmt: skip
        assert "\x1b" not in plain and "unknown" in plain

    _faults_and_a_long_job(daemon, tmp_path)
    out = on_terminal(daemon, "status")
    assert _widest(out) <= 80 and LONG_NAME not in ANSI.sub("", out)
    narrow = on_terminal(daemon, "status", columns=72)
    assert _widest(narrow) <= 72
    assert _widest(on_terminal(daemon, "status", "--wide")) > 80
