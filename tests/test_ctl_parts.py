"""gpuguardctl's parts that need no daemon: --since, the tail of a log, the
follow cursor, --version, a gone reader, and the daemon's event order."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from structlog.testing import capture_logs

from control import FakeController, serving  # tests/control, a package beside this file

from gpuguard import __version__
from gpuguard.ctl import main
from gpuguard.ctl import logs as ctl_logs
from gpuguard.ctl.common import EXIT_BROKEN_PIPE, UsageError
from gpuguard.ctl.live import Cursor
from gpuguard.ctl.wire import since_args
from gpuguard.daemon.control import DaemonController
from gpuguard.daemon.service import Daemon
from gpuguard.events import Event
from gpuguard.health.types import Severity
from gpuguard.store import EventStore

CTL = Path(sys.executable).parent / "gpuguardctl"
NOW = datetime(2025, 1, 31, 12, 0, tzinfo=UTC).timestamp()


def test_version_needs_no_socket(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUGUARD_SOCKET", "/nonexistent/gpuguard.sock")
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"gpuguardctl {__version__}\n"
    done = subprocess.run([str(CTL), "--version"], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"gpuguardctl {__version__}\n", "")


def _to_a_gone_reader(*argv: str) -> subprocess.CompletedProcess[str]:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        return subprocess.run([str(CTL), *argv], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=30)
    finally:
        os.close(write_end)


def test_a_gone_reader_ends_quietly(tmp_path: Path) -> None:
    """`gpuguardctl status --json | true`: no BrokenPipeError traceback, and
    the exit status a shell shows for a tool ended by SIGPIPE."""
    with capture_logs(), serving(tmp_path) as (_, sock):
        for argv in (["status", "--json"], ["status"], ["events"]):
            done = _to_a_gone_reader("--socket", str(sock), *argv)
            assert (done.returncode, done.stderr) == (EXIT_BROKEN_PIPE, ""), argv
    done = _to_a_gone_reader("--help")  # argparse's own output: it ignores the error itself
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.parametrize(
    ("text", "sent"),
    [
        ("0", {"since_id": 0}),
        ("1234", {"since_id": 1234}),
        ("90s", {"since": "2025-01-31T11:58:30+00:00"}),
        ("10m", {"since": "2025-01-31T11:50:00+00:00"}),
        ("2h", {"since": "2025-01-31T10:00:00+00:00"}),
        ("1.5d", {"since": "2025-01-30T00:00:00+00:00"}),
        ("1w", {"since": "2025-01-24T12:00:00+00:00"}),
        ("2025-01-31T12:00:00Z", {"since": "2025-01-31T12:00:00+00:00"}),
        ("2025-01-31T13:30+01:00", {"since": "2025-01-31T12:30:00+00:00"}),
    ],
)
def test_since_is_an_id_a_time_ago_or_a_time(text: str, sent: dict[str, Any]) -> None:
    assert since_args(text, NOW) == sent


@pytest.fixture
def india(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time is UTC+05:30 (a POSIX TZ string: no zone database needed)."""
    monkeypatch.setenv("TZ", "IST-5:30")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_since_without_a_zone_is_local_time(india: None) -> None:
    assert since_args("2025-01-31T17:30", NOW) == {"since": "2025-01-31T12:00:00+00:00"}


@pytest.mark.parametrize("text", ["", "yesterday", "10 m", "-5m", "5y", "\u00b2", "2025-13-01"])
def test_since_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(UsageError, match="give an event id"):
        since_args(text, NOW)


@pytest.mark.parametrize(
    ("content", "n", "tail"),
    [
        (b"", 10, b""),
        (b"a\nb\nc\n", 10, b"a\nb\nc\n"),
        (b"a\nb\nc\n", 2, b"b\nc\n"),
        (b"a\nb\nc", 2, b"b\nc"),  # a last line still being written counts
        (b"a\nb\nc\n", 0, b""),
        (b"\n\n\n", 2, b"\n\n"),
        (b"".join(b"line %d\n" % i for i in range(1000)), 3, b"line 997\nline 998\nline 999\n"),
    ],
)
def test_last_lines(monkeypatch: pytest.MonkeyPatch, content: bytes, n: int, tail: bytes) -> None:
    monkeypatch.setattr(ctl_logs, "BLOCK", 7)  # many blocks, lines across their edges
    f = io.BytesIO(content)
    assert ctl_logs.last_lines(f, n) == tail
    assert f.tell() == len(content)  # --follow goes on from the end


def _event(**kw: Any) -> dict[str, Any]:
    return {"id": None, "ts": "2025-01-31T12:00:00.000Z", "kind": "xid", "gpu": None, "job": None, "message": "m"} | kw


def test_the_follow_cursor_prints_an_event_once() -> None:
    cursor = Cursor(last_id=7)
    waiting = _event(message="written while the disk was full")
    assert cursor.fresh([_event(id=3), waiting]) == [_event(id=3), waiting]
    assert cursor.last_id == 7  # an older id does not move it back
    assert cursor.fresh([waiting]) == []  # the store hands unwritten events back every time
    assert cursor.fresh([_event(id=8), waiting | {"id": 9}]) == [_event(id=8)]  # written at last: already shown
    assert cursor.last_id == 9


def test_the_daemon_orders_events_by_time_then_id(tmp_path: Path) -> None:
    """An event's ts is when it was observed; one observed earlier may be
    stored later. `events` is oldest first by ts, with the limit and
    `since_id` counted in store order and `since_ts` by time."""
    store = EventStore(tmp_path / "gpuguard.db")
    try:
        for kind, ts in (("a", 100.0), ("b", 50.0), ("c", 200.0), ("d", 200.0)):
            store.append(Event(kind=kind, severity=Severity.INFO, message=kind, ts=ts))
        controller = DaemonController(cast(Daemon, SimpleNamespace(store=store, monitor=None)))

        def kinds(limit: int = 100, **kw: Any) -> list[str]:
            return [e["kind"] for e in controller.events(limit, None, None, **kw)]

        assert kinds() == ["b", "a", "c", "d"]
        assert kinds(limit=3) == ["b", "c", "d"]  # the newest three stored
        assert kinds(since_id=1) == ["b", "c", "d"]
        assert kinds(since_ts=100.0) == ["a", "c", "d"]
        assert kinds(since_id=2, since_ts=150.0) == ["c", "d"]
        assert kinds(limit=0) == []
    finally:
        store.close()


def test_events_says_when_older_ones_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The default shows the newest 100: a hint on stderr says older ones exist and how to get them."""
    fake = FakeController()
    fake.events_list = [dict(fake.events_list[0], message=f"event {n}") for n in range(150)]
    with serving(tmp_path, fake) as (_, sock):
        assert main(["--socket", str(sock), "events"]) == 0
        out, err = capsys.readouterr()
        assert out.count("event ") == 100 and "showing the newest 100 events" in err
        assert main(["--socket", str(sock), "events", "--limit", "200"]) == 0
        out, err = capsys.readouterr()
        assert out.count("event ") == 150 and "showing the newest" not in err
