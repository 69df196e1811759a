"""The chaos run's machine: the daemon under test, the jobs it supervises, the
state disk, and the processes of the run (bench/chaos.py drives them)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from gpuguard.control.client import CommandFailed, DaemonUnreachable, request

REPO = Path(__file__).resolve().parent.parent
TRAINER = REPO / "tests" / "supervisor" / "jobs" / "trainer.py"
GPUS = 4
STEP_S = 0.05
EVERY = 20  # trainer checkpoint period, in steps: 1 s, slower than the watcher's settle time
WEDGE_AFTER_S = 2.0  # [health] nvml_wedged_after_s
CONFIG = f"""\
[daemon]
socket_mode = "0666"
[monitor]
poll_interval_s = 0.2
nvml_timeout_s = 0.5
hang_timeout_s = 2.0
hang_startup_timeout_s = 2.0  # a trainer stopped before its first heartbeat hangs too
[health]
restart_app_window_s = 3.0
nvml_wedged_after_s = {WEDGE_AFTER_S}
[reset]
probation_s = 1.0
max_per_gpu_per_day = 10000
[jobs]
checkpoint_grace_s = 1.0
stop_timeout_s = 0.5
max_restarts = 500
backoff_initial_s = 0.2
backoff_max_s = 1.0
stable_after_s = 5.0
"""
START_RETRY_S = 1.0  # like the unit's Restart=on-failure: a daemon that exits at start is started again
START_WITHIN_S = 60.0
DISK_SIZE = "64m"
GRANDCHILD_MARK = "time.sleep(600)"  # in the cmdline of the grandchild `trainer.py --child-session` starts


@dataclass(frozen=True)
class JobKind:
    """One chaos job: the trainer's flags, its own max_restarts, and whether it may end failed."""

    flags: tuple[str, ...]
    why: str
    max_restarts: int | None = None  # None: [jobs] max_restarts
    may_fail: bool = False


def job_kinds(steps: int) -> dict[str, JobKind]:
    """The four jobs, each with a misbehaviour of its own."""
    return {
        "escape": JobKind(("--child-session",), "leaves a SIGTERM-proof grandchild in a session of its own"),
        "loop": JobKind(
            ("--tempfail-every", str(EVERY)), "exits 75 unasked every 20 steps",
            max_restarts=max(5, steps // EVERY // 2), may_fail=True,  # a loop reaches it half way
        ),
        "nohandler": JobKind(("--no-handler", "--save-on-term"), "no handler for the checkpoint signal; saves on SIGTERM"),
        "deaf": JobKind(("--ignore-signal",), "ignores the checkpoint signal and SIGTERM"),
    }


class Daemon:
    """gpuguardd --simulate 4 as a child process, killed and restarted at will."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.state = base / "state"
        self.socket = base / "run" / "gpuguard.sock"
        self.socket.parent.mkdir(parents=True)
        self.config = base / "config.toml"
        self.config.write_text(CONFIG)
        self.log = base / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.failed_starts = 0  # exits during start-up (a full disk), each started again
        self.down_at: list[float] = []  # time.time() of every kill: events after it may be lost

    def start(self) -> None:
        """Start it and wait for its first poll; start again (as systemd would) while it exits at start."""
        argv = [sys.executable, "-m", "gpuguard.daemon.main", "--simulate", str(GPUS), "--config", str(self.config),
                "--state-dir", str(self.state), "--socket", str(self.socket)]
        deadline = time.monotonic() + START_WITHIN_S
        while True:
            with self.log.open("ab") as out:
                self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
            self.starts += 1
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if request(self.socket, "status", {}, timeout_s=2)["daemon"].get("last_poll_at"):
                        return
                except (DaemonUnreachable, CommandFailed):
                    pass
                time.sleep(0.05)
            if time.monotonic() >= deadline:
                raise RuntimeError(f"gpuguardd did not come up within {START_WITHIN_S:.0f} s; see {self.log}")
            self.failed_starts += 1
            time.sleep(START_RETRY_S)

    def revive(self) -> str | None:
        """Restart=on-failure: a daemon that exited by itself is started again; returns how it
        ended (its exit status and the last fatal error it logged), or None while it runs."""
        if self.proc is None or self.proc.poll() is None:
            return None
        code = self.proc.returncode
        self.down_at.append(time.time())
        why = ""
        try:
            for line in reversed(self.log.read_text(errors="replace").splitlines()):
                if '"fatal"' in line:
                    why = json.loads(line).get("error", "")
                    break
        except (OSError, ValueError):
            pass
        time.sleep(START_RETRY_S)
        self.start()
        return f"exit {code}" + (f": {why}" if why else "")

    def kill(self) -> None:
        """SIGKILL, the way a crash or the OOM killer ends it."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.down_at.append(time.time())
        time.sleep(0.3)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def call(self, cmd: str, **args: Any) -> Any:
        return request(self.socket, cmd, args, timeout_s=10)

    def logged(self, kind: str) -> int:
        """How many lines of its log (every life of it) say `kind` (an internal error, say)."""
        try:
            return self.log.read_text(errors="replace").count(f'"{kind}"')
        except OSError:
            return 0

    def saved_attempts(self) -> dict[str, int]:
        """Each job's attempt number as its records file holds it (read while no daemon runs)."""
        found = {}
        for path in (self.state / "records" / "jobs").glob("*.json"):
            try:
                saved = json.loads(path.read_text())
                found[saved["name"]] = int(saved["record"]["attempt"]["number"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return found

    def quarantined(self) -> set[str]:
        """The GPUs the records dir holds as excluded (read while no daemon runs)."""
        try:
            saved = json.loads((self.state / "records" / "quarantine.json").read_text())
        except (OSError, ValueError):
            return set()
        return {g["uuid"] if isinstance(g, dict) else str(g) for g in saved.get("gpus", [])}


# --- the state disk ---------------------------------------------------------
def mount_small_disk(path: Path) -> bool:
    """A tmpfs of its own for the state dir, so filling it harms nothing else."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE},mode=0711", "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


def fill_for(filler: Path, seconds: float) -> threading.Event:
    """Fill the disk under filler to ENOSPC and free it after `seconds`; the event is set once freed."""
    chunk = b"\0" * (1 << 20)
    try:
        with filler.open("wb") as f:
            while True:
                f.write(chunk)
                f.flush()
    except OSError:
        pass
    freed = threading.Event()

    def free() -> None:
        filler.unlink(missing_ok=True)
        freed.set()

    threading.Timer(seconds, free).start()
    return freed


def corrupt(db: Path) -> None:
    """Overwrite the first 100 bytes (SQLite's header) in place, and the WAL's header too:
    a WAL holding a newer page 1 would otherwise hide the damage (SQLite reads page 1
    from it), and the next checkpoint would repair the file."""
    for path, size in ((db, 100), (Path(f"{db}-wal"), 32)):
        if path == db or path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.pwrite(fd, (b"chaos was here. " * 7)[:size], 0)
            finally:
                os.close(fd)


def db_bytes(state: Path) -> int:
    """The live database with its WAL and shm (files moved aside as corrupt do not count)."""
    return sum(p.stat().st_size for p in (state / n for n in ("gpuguard.db", "gpuguard.db-wal", "gpuguard.db-shm")) if p.exists())


# --- what the jobs leave ----------------------------------------------------
def ts_of(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()


def read_step(path: Path) -> int | None:
    try:
        with zipfile.ZipFile(path) as archive:
            return int(pickle.loads(archive.read("archive/data.pkl"))["step"])
    except (OSError, zipfile.BadZipFile, KeyError, ValueError, EOFError, pickle.UnpicklingError):
        return None


def attempts(workdir: Path) -> list[dict[str, Any]]:
    """The trainer's own record of each attempt (one JSON line each)."""
    try:
        lines = (workdir / "attempts.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            continue
    return out


def run_processes(base: Path, state: Path, daemon_pid: int | None) -> list[tuple[psutil.Process, str]]:
    """Every process of the run besides the daemon: trainers and what they started (their cwd
    is a workdir under base), and exit-status wrappers (their command names a file in state)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid in (daemon_pid, os.getpid()):
                continue
            line = " ".join(proc.info["cmdline"] or ())
            if "exitcode.py" in line and str(state) in line:
                found.append((proc, "wrapper"))
            elif Path(proc.cwd()).parent == base:
                found.append((proc, "trainer" if str(TRAINER) in line else "grandchild" if GRANDCHILD_MARK in line else "other"))
        except psutil.Error:
            continue
    return found


def kill_all(procs: list[tuple[psutil.Process, str]]) -> None:
    """SIGCONT (a hung trainer) and SIGKILL each; one already gone is skipped."""
    for proc, _ in procs:
        try:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        except psutil.Error:
            pass


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def grandchild_alive(pid: int) -> bool:
    """Is pid still the grandchild a trainer started (not a reused pid)?"""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and GRANDCHILD_MARK in " ".join(proc.cmdline())
    except psutil.Error:
        return False
