"""The tests' one harness: a real gpuguardd on simulated GPUs driven through gpuguardctl
(DaemonProc, running_daemon, and what it recorded: DaemonProc.events/kinds/job/polls_after),
a gpuguardctl that keeps running (Running), sd_notify's socket (NotifySocket), acting as
another user (as_nobody), and the one way to wait for a condition (wait_until).

Plain helpers, imported as `from harness import ...`; the fixtures built on them are in
tests/conftest.py (pytest hands those to every test by name). tests/README.md says where
the rest lives."""

from __future__ import annotations

import json
import os
import pwd
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psutil


BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")
WAIT_S = 30.0  # the bound on a wait for something the daemon does, where a test names none (a loaded 2-core machine: the flake budget)

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


def wait_until(
    probe: Callable[[], T], timeout_s: float, what: str, interval: float = 0.05, detail: Callable[[], str] | None = None
) -> T:
    """Poll until probe() is truthy; returns its value. The one wait loop of the tests: a test
    waits for the condition it needs, never sleeps and hopes. On a timeout the message names
    `what`, and adds detail() (say, the last status) when given."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            more = f"; {detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}{more}")
        time.sleep(interval)


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class DaemonProc:
    """A `gpuguardd --simulate N` under `tmp` (its own state dir, socket and config: 0.2 s polls,
    0.5 s NVML deadline, extra_config appended), started and stopped by the test; most tests
    want running_daemon or the `daemon` fixture, which always stop it."""

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
        proc = self.proc

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"gpuguardd exited {proc.returncode}:\n{self.log.read_text()}")
            if not self.socket.exists():
                return False
            result = self.ctl("status", "--json", check=False)
            return result.returncode == 0 and bool(json.loads(result.stdout)["daemon"]["last_poll_at"])

        wait_until(up, timeout_s, "gpuguardd to come up", detail=lambda: f"its log:\n{self.log.read_text()}")

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

    def wait_for(self, predicate: Callable[[dict[str, Any]], Any], timeout_s: float = 20.0, what: str = "condition") -> float:
        """Poll status until predicate(status) holds; returns the seconds it took. The default bound
        is for a loaded 2-core machine (the flake budget): a passing wait costs only its own time."""
        def last() -> str:
            # the jobs whole and each GPU in one line: what a wait is usually about
            status = self.status()
            gpus = [{k: g.get(k) for k in ("index", "state", "reason", "jobs")} for g in status["gpus"]]
            return f"last status: jobs {json.dumps(status['jobs'], indent=1)[:4000]}\ngpus {json.dumps(gpus)}"

        start = time.monotonic()
        wait_until(lambda: predicate(self.status()), timeout_s, what, detail=last)
        return time.monotonic() - start

    # --- what the daemon recorded and did, read through gpuguardctl

    def events(
        self, kind: str | None = None, job: str | None = None, gpu: str | None = None, limit: int = 1000
    ) -> list[dict[str, Any]]:
        """`gpuguardctl events --json --limit N` (oldest first), optionally for one job or GPU,
        keeping only the events of one kind."""
        args = ["events", "--json", "--limit", str(limit)]
        args += ["--job", job] if job else []
        args += ["--gpu", gpu] if gpu else []
        return [e for e in json.loads(self.ctl(*args).stdout) if kind is None or e["kind"] == kind]

    def kinds(self, job: str | None = None, gpu: str | None = None, limit: int = 1000) -> list[str]:
        """The kinds of `events(job=..., gpu=...)`, oldest first."""
        return [e["kind"] for e in self.events(job=job, gpu=gpu, limit=limit)]

    def job(self, name: str) -> dict[str, Any]:
        """The job's entry in `status` (AssertionError if there is none)."""
        found = self.find_job(name)
        assert found is not None, f"no job {name!r} in status"
        return found

    def find_job(self, name: str) -> dict[str, Any] | None:
        return next((j for j in self.status()["jobs"] if j["name"] == name), None)

    def polls_after(self, moment: float, polls: int = 3) -> None:
        """Wait until the daemon's main loop has polled `polls` times after `moment` (time.time()).
        Each poll is followed by an evaluation and a supervisor tick, so once the next poll is
        seen that tick is done: what the daemon would do about the state at `moment`, it has
        done. A negative assert after this is about the daemon, not about a sleep."""
        seen = moment
        for _ in range(polls):
            seen = wait_until(
                lambda: (t := self.status()["daemon"]["last_poll_at"]) is not None and t > seen and t,
                10, f"a poll after {seen}",
            )  # fmt: skip


@contextmanager
def running_daemon(
    tmp: Path, gpus: int = 2, extra_config: str = "", *, daemon_keys: str = "", stop_jobs: Iterable[str] = ()
) -> Iterator[DaemonProc]:
    """A started DaemonProc, stopped at the end (unless the test stopped it itself). Jobs
    outlive their daemon by design: the ones named in stop_jobs are stopped first.
    daemon_keys go into the [daemon] table DaemonProc writes (TOML allows it once)."""
    d = DaemonProc(tmp, gpus=gpus, extra_config=extra_config)
    if daemon_keys:
        d.config.write_text(d.config.read_text().replace("[daemon]\n", "[daemon]\n" + daemon_keys, 1))
    d.start()
    try:
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            for name in stop_jobs:
                d.ctl("stop", name, check=False)
        if d.proc is not None:
            d.stop()


def _default_sigint() -> None:
    """Ctrl-C as in a terminal, even when the tests run where SIGINT is ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Running:
    """A gpuguardctl that keeps running (events --follow, status --watch, run --wait, logs
    --follow); its stdout read line by line and its stderr collected, each on a thread."""

    def __init__(self, d: DaemonProc, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(BIN / "gpuguardctl"), "--socket", str(d.socket), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint,
        )  # fmt: skip
        self.seen: list[str] = []
        self.err: list[str] = []
        self._lines: queue.Queue[str] = queue.Queue()
        self._readers = [threading.Thread(target=read, daemon=True) for read in (self._read_out, self._read_err)]
        for reader in self._readers:
            reader.start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # line by line: a test may wait for one
            self.err.append(line)

    def until(self, matches: Callable[[str], bool], what: str) -> str:
        """The next line that matches, within WAIT_S."""
        deadline = time.monotonic() + WAIT_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(line)
            if matches(line):
                return line
        raise AssertionError(f"no line with {what} within {WAIT_S} s; seen: {self.seen}")

    def wait(self) -> tuple[int, str]:
        """The exit status (within WAIT_S) and stderr; every line seen."""
        code = self.proc.wait(timeout=WAIT_S)
        for reader in self._readers:
            reader.join(timeout=WAIT_S)
        while not self._lines.empty():
            self.seen.append(self._lines.get())
        return code, "".join(self.err)

    def interrupt(self) -> tuple[int, str]:
        """Ctrl-C, then `wait`."""
        self.proc.send_signal(signal.SIGINT)
        return self.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=WAIT_S)


class NotifySocket:
    """A NOTIFY_SOCKET the test binds at `path`: every sd_notify datagram a real gpuguardd
    sends there, as text with the monotonic time it came, read on a thread (a full socket
    queue would block the daemon's main loop). The test sets NOTIFY_SOCKET itself
    (DaemonProc passes the environment on)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.received: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.received.append((time.monotonic(), data.decode()))

    @property
    def seen(self) -> list[str]:
        """Every datagram so far, oldest first."""
        return [message for _, message in list(self.received)]

    def after(self, start: int, prefix: str, timeout_s: float = 15.0) -> int:
        """The index of the first datagram from `start` on that starts with `prefix` (waiting for it)."""
        return wait_until(
            lambda: next((i + 1 for i, m in enumerate(self.seen[start:], start) if m.startswith(prefix)), 0),
            timeout_s,
            f"{prefix!r} after datagram {start}",
            detail=lambda: f"got {self.seen[start:][:10]}",
        ) - 1

    def between(self, start: float, end: float, message: str) -> list[float]:
        """When `message` came, between the monotonic times start and end."""
        return [t for t, m in list(self.received) if start <= t <= end and m == message]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
