"""gpuguardctl's commands that keep running, against a real `gpuguardd
--simulate 2`: events --since and --follow, status --watch, run --wait."""

from __future__ import annotations

import json
import signal
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from harness import BIN, WAIT_S, DaemonProc, Running, wait_until
from gpuguard.ctl.common import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED

pytestmark = pytest.mark.e2e


def events(d: DaemonProc, *args: str) -> list[dict[str, Any]]:
    return json.loads(d.ctl("events", "--json", *args).stdout)


def test_events_since_an_id_a_time_ago_or_a_time(daemon: DaemonProc) -> None:
    daemon.ctl("exclude", "1", "--reason", "fan")  # an event now, and none after it
    every = events(daemon)
    assert [e["kind"] for e in every] == ["daemon_started", "gpu_excluded"]
    assert every[0]["ts"] <= every[1]["ts"]
    assert events(daemon, "--since", str(every[0]["id"])) == every[1:]
    assert events(daemon, "--since", str(every[1]["id"])) == []
    assert events(daemon, "--since", "1h") == every
    assert events(daemon, "--since", "1h", "--limit", "1") == every[1:]
    assert events(daemon, "--since", every[1]["ts"]) == every[1:]
    assert events(daemon, "--since", (datetime.now(UTC) + timedelta(minutes=5)).isoformat()) == []
    assert daemon.ctl("events", "--since", "2h", "--gpu", "0").stdout == "no events\n"
    bad = daemon.ctl("events", "--since", "tuesday", check=False)
    assert bad.returncode == 2 and "--since 'tuesday'" in bad.stderr


def test_events_follow_prints_each_new_event_once_until_interrupted(daemon: DaemonProc) -> None:
    newest = events(daemon)[-1]["id"]
    table = Running(daemon, "events", "--follow")
    # after the newest event so far, by id: a follower that starts after the Xid still prints it (a
    # `--limit 0` follower starts at whatever is newest when it connects: on a loaded machine that
    # can be after the Xid)
    lines = Running(daemon, "events", "-f", "--json", "--gpu", "1", "--since", str(newest))
    try:
        assert table.until(lambda s: s.startswith("TIME"), "the header").split()[:3] == ["TIME", "SEVERITY", "KIND"]
        table.until(lambda s: "daemon_started" in s, "the newest event so far")
        daemon.ctl("inject", "1", "xid", "79")
        table.until(lambda s: " xid " in s, "the injected Xid")
        xid = json.loads(lines.until(lambda s: '"kind": "xid"' in s, "the Xid as JSON"))
        assert xid["xid"] == 79 and xid["gpu"] == daemon.gpu(1)["uuid"]
        daemon.ctl("inject", "0", "thermal", "95")
        table.until(lambda s: " thermal " in s, "an event after the Xid")
        for follower in (table, lines):
            code, err = follower.interrupt()
            assert (code, err) == (0, "")
        kinds = [json.loads(s)["kind"] for s in lines.seen]
        assert "daemon_started" not in kinds and "thermal" not in kinds  # only after `newest`; --gpu 1
        ids = [json.loads(s)["id"] for s in lines.seen]
        assert len(ids) == len(set(ids))
        assert sum(" xid " in s for s in table.seen) == 1
    finally:
        table.close()
        lines.close()


def test_follow_ends_when_its_reader_does(daemon: DaemonProc) -> None:
    """`events -f | grep -m1 KIND`: once grep has its line, follow ends, with
    no new event to write (as `tail -f` does)."""
    proc = subprocess.Popen(
        [str(BIN / "gpuguardctl"), "--socket", str(daemon.socket), "events", "-f"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().startswith(b"TIME")
    proc.stdout.close()
    assert proc.wait(timeout=WAIT_S) == EXIT_BROKEN_PIPE
    assert proc.stderr is not None and proc.stderr.read() == b""


def test_status_watch_redraws_until_interrupted(daemon: DaemonProc) -> None:
    text = Running(daemon, "status", "--watch", "0.2")
    as_json = Running(daemon, "status", "--json", "--watch", "0.2")
    try:
        for _ in range(2):
            text.until(lambda s: s.startswith("every 0.2 s: gpuguardctl status"), "a redraw's head")
            text.until(lambda s: s.startswith("daemon: gpuguardd"), "a redraw's last line")
            status = json.loads(as_json.until(lambda s: s.startswith("{"), "a status line"))
            assert [g["index"] for g in status["gpus"]] == [0, 1]
        assert text.interrupt() == (0, "") and as_json.interrupt() == (0, "")
    finally:
        text.close()
        as_json.close()
    bad = daemon.ctl("status", "--watch", "0", check=False)
    assert bad.returncode == 2 and "give seconds" in bad.stderr


def _job_state(d: DaemonProc, name: str) -> str | None:
    return next((j["state"] for j in d.status()["jobs"] if j["name"] == name), None)


def test_run_wait_exits_with_the_jobs_outcome(daemon: DaemonProc, tmp_path: Path) -> None:
    run = ("run", "--wait", "--workdir", str(tmp_path), "--max-restarts", "0", "--name")
    done = daemon.ctl(*run, "ok", "--", "sh", "-c", "echo fine")
    assert done.stdout.splitlines()[-1] == "Job ok succeeded after 1 attempt and 0 restarts."
    failed = daemon.ctl(*run, "bad", "--", "sh", "-c", "exit 3", check=False)
    assert failed.returncode == 1 and "run: job bad failed: exit 3" in failed.stderr
    waiting = Running(daemon, *run, "halted", "--", "sleep", "60")
    try:
        wait_until(lambda: _job_state(daemon, "halted") == "running", WAIT_S, "the job running")
        daemon.ctl("stop", "halted")
        code, err = waiting.wait()
        assert code == 1 and "run: job halted stopped" in err
    finally:
        waiting.close()


def test_ctrl_c_while_waiting_leaves_the_job_running(daemon: DaemonProc, tmp_path: Path) -> None:
    waiting = Running(daemon, "run", "--wait", "--workdir", str(tmp_path), "--name", "long", "--", "sleep", "60")
    try:
        wait_until(lambda: _job_state(daemon, "long") == "running", WAIT_S, "the job running")
        code, err = waiting.interrupt()
        assert code == EXIT_INTERRUPTED
        assert err == "gpuguardctl: run: stopped waiting; job long is still running (gpuguardctl stop long stops it)\n"
        assert _job_state(daemon, "long") == "running"
    finally:
        waiting.close()
        daemon.ctl("stop", "long", check=False)


def test_run_wait_rides_out_a_daemon_restart(daemon: DaemonProc, tmp_path: Path) -> None:
    go = tmp_path / "go"
    script = f"for i in $(seq 300); do [ -e {go} ] && exit 0; sleep 0.1; done; exit 1"  # at most 30 s
    waiting = Running(daemon, "run", "--wait", "--workdir", str(tmp_path), "--name", "kept", "--", "sh", "-c", script)
    try:
        wait_until(lambda: _job_state(daemon, "kept") == "running", WAIT_S, "the job running")
        daemon.stop(signal.SIGKILL)
        wait_until(lambda: "trying again for 60 s" in "".join(waiting.err), WAIT_S, "run --wait to miss the daemon")
        daemon.start()
        go.touch()
        code, err = waiting.wait()
        assert code == 0 and "answers again" in err
        assert waiting.seen[-1].startswith("Job kept succeeded")
    finally:
        waiting.close()
        daemon.ctl("stop", "kept", check=False)
