"""Process control of managed jobs, with small Python scripts this test starts itself."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from harness import gone, wait_until
from gpuguard.supervisor import exitcode, pids
from gpuguard.supervisor.process import JobProcess, UserSpec, adopt, spawn

pytestmark = pytest.mark.e2e

PY = sys.executable


def _log_has(path: Path, text: str) -> Callable[[], bool]:
    return lambda: path.exists() and text in path.read_text()


def _wait_log(path: Path, text: str) -> None:
    wait_until(_log_has(path, text), 5, f"{text!r} in {path}", 0.01)


def _pid_from_log(path: Path, tag: str) -> int:
    _wait_log(path, tag + "=")
    line = next(ln for ln in path.read_text().splitlines() if ln.startswith(tag + "="))
    return int(line.split("=", 1)[1])


class Jobs:
    """Spawns jobs for one test and kills whatever of them is left at its end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[JobProcess] = []

    def start(self, script: str, name: str = "job", **kw: object) -> tuple[JobProcess, Path]:
        log = self.tmp / f"{name}.log"
        job = spawn(
            [PY, "-c", textwrap.dedent(script)],
            env={**os.environ, **kw.pop("env", {})},  # type: ignore[dict-item]
            cwd=kw.pop("cwd", self.tmp),  # type: ignore[arg-type]
            user=kw.pop("user", None),  # type: ignore[arg-type]
            log_path=log,
        )
        self.started.append(job)
        return job, log


@pytest.fixture
def jobs(tmp_path: Path) -> Iterator[Jobs]:
    j = Jobs(tmp_path)
    yield j
    for job in j.started:
        job.signal_tree(signal.SIGKILL)
        job.wait(2)


TRAP_USR1 = """
    import signal, sys, time
    signal.signal(signal.SIGUSR1, lambda *_: sys.exit(75))
    print("ready", flush=True)
    time.sleep(30)
"""


def test_env_cwd_log_and_own_session(jobs: Jobs) -> None:
    job, log = jobs.start(
        """
        import os, sys
        print("foo=" + os.environ["FOO"], "cwd=" + os.getcwd(), "stdin=" + repr(sys.stdin.read()))
        print("sid=%d" % os.getsid(0), flush=True)
        print("to-stderr", file=sys.stderr)
        sys.exit(3)
        """,
        env={"FOO": "bar"},
    )
    assert job.wait(5) == 3
    assert job.returncode == 3 and not job.alive()
    text = log.read_text()
    assert f"foo=bar cwd={jobs.tmp} stdin=''" in text and "to-stderr" in text
    assert _pid_from_log(log, "sid") == job.sid == job.pgid == job.pid != os.getsid(0)
    assert stat.S_IMODE(log.stat().st_mode) == 0o640
    assert exitcode.read_status(job.status_path) == 3


def test_log_is_appended_not_truncated(jobs: Jobs) -> None:
    (jobs.tmp / "job.log").write_text("earlier attempt\n")
    job, log = jobs.start("print('second attempt')")
    assert job.wait(5) == 0
    assert log.read_text() == "earlier attempt\nsecond attempt\n"


def test_missing_command_fails_at_spawn(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        spawn(["no-such-command-xyz"], env={"PATH": "/usr/bin"}, cwd=tmp_path, user=None, log_path=tmp_path / "l")


def test_checkpoint_handshake_exit_75(jobs: Jobs) -> None:
    job, log = jobs.start(TRAP_USR1)
    _wait_log(log, "ready")
    phases: list[str] = []
    started = time.monotonic()
    result = job.stop(signal.SIGUSR1, grace_s=5, term_timeout_s=5, on_phase=phases.append)
    assert time.monotonic() - started < 2
    assert (result.returncode, result.phase, result.killed, result.survivors) == (75, "checkpoint", (), ())
    assert phases == ["checkpoint"]


def test_checkpoint_signal_before_the_job_is_up_is_not_lost(jobs: Jobs) -> None:
    """The wrapper queues it until the job exists; a job that has no handler yet dies of it."""
    job, _ = jobs.start(TRAP_USR1)
    result = job.stop(signal.SIGUSR1, grace_s=5, term_timeout_s=1)
    assert result.phase == "checkpoint" and result.returncode in (75, -signal.SIGUSR1)


def test_stubborn_job_is_killed_after_grace_and_term_timeout(jobs: Jobs) -> None:
    job, log = jobs.start(
        """
        import signal, time
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(30)
        """
    )
    _wait_log(log, "ready")
    inner = [p.pid for p in job.tree() if p.pid != job.pid]
    phases: list[str] = []
    started = time.monotonic()
    result = job.stop(signal.SIGUSR1, grace_s=0.3, term_timeout_s=0.3, on_phase=phases.append)
    assert 0.6 <= time.monotonic() - started < 3
    assert phases == ["checkpoint", "term", "kill"]
    assert result.phase == "kill" and result.returncode == -signal.SIGKILL
    assert set(inner) <= set(result.killed) and result.survivors == ()
    assert all(gone(pid) for pid in inner)


def test_sigterm_reaches_the_job_once_and_death_by_signal_propagates(jobs: Jobs) -> None:
    job, log = jobs.start(
        """
        import os, signal, time
        def on_term(*_):
            print("term", flush=True)
            time.sleep(0.2)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        signal.signal(signal.SIGTERM, on_term)
        print("ready", flush=True)
        time.sleep(30)
        """
    )
    _wait_log(log, "ready")
    result = job.stop(None, grace_s=0, term_timeout_s=5)
    assert (result.returncode, result.phase) == (-signal.SIGTERM, "term")
    assert log.read_text().count("term") == 1
    assert exitcode.read_status(job.status_path) == -signal.SIGTERM


SLEEPER = """
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("grandchild=%d" % os.getpid(), flush=True)
time.sleep(30)
"""


def _write(path: Path, script: str) -> str:
    path.write_text(textwrap.dedent(script))
    return str(path)


def _middle(tmp: Path, wait_for: Path | None) -> str:
    """A script that starts a SIGTERM-ignoring grandchild in a new session, then exits (once wait_for exists)."""
    return _write(
        tmp / "middle.py",
        f"""
        import os, subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", {SLEEPER!r}], start_new_session=True)
        while {str(wait_for)!r} != "None" and not os.path.exists({str(wait_for)!r}):
            time.sleep(0.01)
        """,
    )


def _main(tmp: Path, middle: str, *, wait: bool) -> str:
    """The job's main process: runs the middle script (waiting for it or not) and sleeps."""
    return f"""
        import subprocess, sys, time
        m = subprocess.Popen([sys.executable, {middle!r}])
        if {wait}:
            m.wait()
            print("middle-gone", flush=True)
        time.sleep(30)
    """


def test_grandchild_in_its_own_session_dies_with_the_tree(jobs: Jobs) -> None:
    job, log = jobs.start(_main(jobs.tmp, _middle(jobs.tmp, jobs.tmp / "never"), wait=False))
    grandchild = _pid_from_log(log, "grandchild")
    assert os.getsid(grandchild) != job.sid
    assert grandchild in {p.pid for p in job.tree()}
    result = job.stop(signal.SIGUSR1, grace_s=0.2, term_timeout_s=0.3)
    # The job's main process does not handle SIGUSR1: it dies of it in the grace.
    assert (result.phase, result.returncode, result.survivors) == ("checkpoint", -signal.SIGUSR1, ())
    assert grandchild in result.killed  # it ignores SIGTERM
    wait_until(lambda: gone(grandchild), 5, "the grandchild's end", 0.01)


def test_orphan_seen_once_is_still_killed(jobs: Jobs) -> None:
    """Without a subreaper the orphan goes to init; the known set still finds it."""
    go = jobs.tmp / "go"
    job, log = jobs.start(_main(jobs.tmp, _middle(jobs.tmp, go), wait=True))
    orphan = _pid_from_log(log, "grandchild")
    assert orphan in {p.pid for p in job.tree()}  # one monitor tick sees it
    go.touch()
    _wait_log(log, "middle-gone")
    assert orphan in {p.pid for p in job.tree()}
    result = job.stop(None, grace_s=0, term_timeout_s=0.3)
    assert orphan in result.killed and result.survivors == ()
    wait_until(lambda: gone(orphan), 5, "the orphan's end", 0.01)


SUBREAPER_DAEMON = """
import json, os, sys, time
from pathlib import Path
import psutil
from gpuguard.supervisor.process import become_subreaper, spawn
tmp, script = Path(sys.argv[1]), sys.argv[2]
assert become_subreaper()
log = tmp / "job.log"
job = spawn([sys.executable, "-c", script], env=dict(os.environ), cwd=tmp, user=None, log_path=log)
while "middle-gone" not in log.read_text() or "grandchild=" not in log.read_text():
    time.sleep(0.01)
orphan = int(log.read_text().split("grandchild=")[1].split()[0])
found = orphan in {p.pid for p in job.tree()}
parent = psutil.Process(orphan).ppid()
result = job.stop(None, grace_s=0, term_timeout_s=0.3)
try:
    alive = psutil.Process(orphan).status() != psutil.STATUS_ZOMBIE
except psutil.NoSuchProcess:
    alive = False
print(json.dumps({"found": found, "parent_is_me": parent == os.getpid(), "orphan": orphan,
                  "killed": list(result.killed), "survivors": list(result.survivors), "alive": alive}))
"""


def test_orphan_never_seen_is_found_through_the_subreaper(tmp_path: Path) -> None:
    """Run as its own "daemon" so that becoming a subreaper leaves pytest alone."""
    script = textwrap.dedent(_main(tmp_path, _middle(tmp_path, None), wait=True))
    out = subprocess.run(
        [PY, "-c", SUBREAPER_DAEMON, str(tmp_path), script], capture_output=True, text=True, timeout=20, check=True
    )
    report = json.loads(out.stdout.splitlines()[-1])
    assert report["found"] and report["parent_is_me"]
    assert report["orphan"] in report["killed"]
    assert report["survivors"] == [] and not report["alive"]


# answers a real-time signal: Linux delivers standard signals (SIGTERM, SIGKILL, ...) before
# real-time ones, so its answer to one sent last says no fatal signal came before it
STRANGER = (
    "import signal, time\n"
    "signal.signal(signal.SIGRTMIN, lambda *_: print('alive', flush=True))\n"
    "print('ready', flush=True)\n"
    "time.sleep(30)\n"
)


def test_reused_pid_is_reported_dead_and_never_signalled(tmp_path: Path) -> None:
    stranger = subprocess.Popen([PY, "-c", STRANGER], start_new_session=True, stdout=subprocess.PIPE, text=True)
    assert stranger.stdout is not None and stranger.stdout.readline() == "ready\n"
    try:
        real = psutil.Process(stranger.pid).create_time()
        impostor = JobProcess(stranger.pid, real - 100.0, tmp_path / "x.exit")
        assert not impostor.alive()
        assert not impostor.signal_main(signal.SIGKILL)
        assert impostor.signal_tree(signal.SIGKILL) == []
        assert impostor.tree() == []
        result = impostor.stop(signal.SIGTERM, grace_s=0.1, term_timeout_s=0.1)
        assert (result.phase, result.returncode, result.killed, result.survivors) == ("already_exited", None, (), ())
        assert adopt(stranger.pid, real - 100.0, status_path=tmp_path / "x.exit") is None
        os.kill(stranger.pid, signal.SIGRTMIN)  # after everything above: it answers unless one of them ended it
        assert stranger.stdout.readline() == "alive\n"
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()
        stranger.stdout.close()


OLD_DAEMON = """
import json, os, sys, time
from pathlib import Path
from gpuguard.supervisor.process import spawn
tmp, script = Path(sys.argv[1]), sys.argv[2]
job = spawn([sys.executable, "-c", script], env=dict(os.environ), cwd=tmp, user=None, log_path=tmp / "job.log")
print(json.dumps({"pid": job.pid, "start_time": job.start_time, "status": str(job.status_path)}), flush=True)
time.sleep(30)
"""


def _spawn_by_old_daemon(tmp: Path, script: str) -> tuple[int, float, Path]:
    """Spawn through another "daemon" process, then SIGKILL that daemon as a crash would."""
    argv = [PY, "-c", OLD_DAEMON, str(tmp), textwrap.dedent(script)]
    daemon = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert daemon.stdout is not None
    record = json.loads(daemon.stdout.readline())
    daemon.kill()
    daemon.wait()
    daemon.stdout.close()
    return record["pid"], record["start_time"], Path(record["status"])


def test_adopted_job_survives_daemon_death_and_checkpoints(tmp_path: Path) -> None:
    pid, start_time, status = _spawn_by_old_daemon(tmp_path, TRAP_USR1)
    _wait_log(tmp_path / "job.log", "ready")
    job = adopt(pid, start_time, status_path=status)
    assert job is not None and job.alive()
    assert job.wait(0.05) is None
    result = job.stop(signal.SIGUSR1, grace_s=5, term_timeout_s=5)
    assert (result.returncode, result.phase, result.survivors) == (75, "checkpoint", ())


def test_without_pidfd_support(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernels before 5.3: create_time checks and os.kill, psutil polling for adopted jobs."""
    monkeypatch.setattr(pids, "pidfd_supported", lambda: False)
    pid, start_time, status = _spawn_by_old_daemon(tmp_path, TRAP_USR1)
    _wait_log(tmp_path / "job.log", "ready")
    assert JobProcess(pid, start_time - 100.0, status).signal_tree(signal.SIGKILL) == []
    job = adopt(pid, start_time, status_path=status)
    assert job is not None and job.alive() and job.wait(0.05) is None
    result = job.stop(signal.SIGUSR1, grace_s=5, term_timeout_s=5)
    assert (result.returncode, result.phase, result.survivors) == (75, "checkpoint", ())


def test_adopted_job_exit_status_and_dead_pid(tmp_path: Path) -> None:
    go = tmp_path / "go"
    pid, start_time, status = _spawn_by_old_daemon(
        tmp_path,
        f"""
        import os, sys, time
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        sys.exit(3)
        """,
    )
    job = adopt(pid, start_time, status_path=status)
    assert job is not None
    go.touch()
    assert job.wait(5) == 3
    assert job.returncode == 3 and not job.alive()
    assert adopt(pid, start_time, status_path=status) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")
@pytest.mark.root
def test_job_runs_as_another_user(tmp_path: Path) -> None:
    nobody = UserSpec.lookup("nobody")
    workdir = Path(tempfile.mkdtemp())
    os.chmod(workdir, 0o755)
    log = tmp_path / "job.log"
    job = spawn(
        ["/bin/sh", "-c", 'echo "uid=$(id -u) umask=$(umask)"; exec sleep 30'],
        env={"PATH": "/usr/bin:/bin"},
        cwd=workdir,
        user=nobody,
        log_path=log,
    )
    try:
        _wait_log(log, "umask=")
        assert f"uid={nobody.uid} umask=0022" in log.read_text()
        inner = [p for p in job.tree() if p.pid != job.pid]
        assert inner and all(p.uids().real == nobody.uid and p.gids().real == nobody.gid for p in inner)
        assert psutil.Process(job.pid).uids().real == 0  # the wrapper keeps the daemon's ids
        assert (log.stat().st_uid, log.stat().st_gid) == (nobody.uid, nobody.gid)
        result = job.stop(None, grace_s=0, term_timeout_s=5)
        assert (result.phase, result.returncode) == ("term", -signal.SIGTERM)
    finally:
        job.signal_tree(signal.SIGKILL)
        job.wait(2)
        os.rmdir(workdir)
