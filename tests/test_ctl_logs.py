"""`gpuguardctl logs NAME [-n LINES] [--follow]` against a real `gpuguardd
--simulate 2`: the job's own output, read with the caller's permissions."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import WAIT_S, DaemonProc, Running, as_nobody, running_daemon, wait_until

pytestmark = pytest.mark.e2e

# prints 1..15, then waits (at most 30 s) for the file `go` before two more lines
TALK = "seq 1 15; for i in $(seq 300); do [ -e go ] && break; sleep 0.1; done; echo more; echo oops >&2"


def _talk(d: DaemonProc, workdir: Path, name: str = "talk") -> None:
    d.ctl("run", "--workdir", str(workdir), "--name", name, "--", "sh", "-c", TALK)


def test_logs_prints_the_last_lines(daemon: DaemonProc, tmp_path: Path) -> None:
    _talk(daemon, tmp_path)
    wait_until(lambda: daemon.ctl("logs", "talk").stdout.endswith("15\n"), WAIT_S, "the job's first output")
    assert daemon.ctl("logs", "talk").stdout == "".join(f"{i}\n" for i in range(6, 16))  # 10 by default
    assert daemon.ctl("logs", "talk", "-n", "3").stdout == "13\n14\n15\n"
    assert daemon.ctl("logs", "-n", "100", "talk").stdout == "".join(f"{i}\n" for i in range(1, 16))
    assert daemon.ctl("logs", "talk", "-n", "0").stdout == ""
    (tmp_path / "go").touch()
    wait_until(lambda: daemon.ctl("logs", "talk", "-n", "2").stdout == "more\noops\n", WAIT_S, "stdout and stderr")
    ghost = daemon.ctl("logs", "ghost", check=False)
    assert (ghost.returncode, ghost.stdout, ghost.stderr) == (1, "", "gpuguardctl: logs: no job 'ghost'\n")
    bad = daemon.ctl("logs", "talk", "-n", "-1", check=False)
    assert bad.returncode == 2 and "give a number of lines" in bad.stderr


def test_logs_follow_waits_for_output_and_prints_it_as_it_comes(daemon: DaemonProc, tmp_path: Path) -> None:
    for gpu in ("0", "1"):
        daemon.ctl("exclude", gpu)  # so the job waits, and has no output yet
    _talk(daemon, tmp_path)
    early = daemon.ctl("logs", "talk")
    assert (early.returncode, early.stdout) == (0, "") and "job talk has no output yet" in early.stderr
    follow = Running(daemon, "logs", "talk", "--follow", "-n", "1")
    try:
        wait_until(lambda: "no output yet" in "".join(follow.err), WAIT_S, "follow to find no output")
        daemon.ctl("include", "0")
        assert [follow.until(lambda s: s == str(i), f"line {i}") for i in (1, 15)] == ["1", "15"]
        (tmp_path / "go").touch()
        log = daemon.state_dir / "jobs" / "talk" / "output.log"
        follow.until(lambda s: s == "oops", "the job's stderr")
        code, err = follow.interrupt()
        assert (code, err) == (0, f"gpuguardctl: logs: job talk has no output yet ({log}); waiting for it\n")
        assert follow.seen == [str(i) for i in range(1, 16)] + ["more", "oops"]
    finally:
        follow.close()


@pytest.mark.root
def test_logs_are_read_with_the_callers_permissions(nobody_python: str, open_dir: Path) -> None:
    """root's job: user nobody may not read its output, and is told why."""
    with running_daemon(open_dir) as d:  # a socket nobody can reach
        try:
            _talk(d, open_dir)
            wait_until(lambda: d.ctl("logs", "talk").stdout.endswith("15\n"), WAIT_S, "the job's first output")
            ctl = [nobody_python, "-c", "import sys; from gpuguard.ctl import main; sys.exit(main())"]
            denied = as_nobody([*ctl, "--socket", str(d.socket), "logs", "talk"])
            assert (denied.returncode, denied.stdout) == (1, ""), denied.stderr
            log = d.state_dir / "jobs" / "talk" / "output.log"
            assert denied.stderr == (
                f"gpuguardctl: logs: cannot read {log}: permission denied "
                "(the job's output is for root and the job's user, root)\n"
            )
        finally:
            (open_dir / "go").touch()
