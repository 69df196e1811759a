"""Every request is validated at the door (issue #14): raw JSON lines over
the socket, each with one bad field, get `bad_request` naming that field, and
the daemon's side never sees them: nothing is called, nothing created on disk."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from control import FakeController, serving  # tests/control, a package beside this one
from harness import DaemonProc, running_daemon

RUN = {"name": "train", "command": ["python", "train.py"], "workdir": "/tmp"}


def run(**changes: Any) -> tuple[str, dict[str, Any]]:
    return "run", {**RUN, **changes}


# (command, args, the field the reply must name)
BAD: list[tuple[str, dict[str, Any], str]] = [
    (*run(name="train\n"), "name"),
    (*run(name="../../etc"), "name"),
    (*run(name="-rf"), "name"),
    (*run(name="x" * 65), "name"),
    (*run(name="\ud800"), "name"),
    ("stop", {"name": "train\n"}, "name"),
    ("snapshots", {"name": "a/b"}, "name"),
    ("rollback", {"name": "train", "snapshot": "s1\n"}, "snapshot"),
    ("events", {"job": "train\n"}, "job"),
    ("events", {"gpu": "0\n"}, "gpu"),
    ("events", {"limit": 10**30}, "limit"),
    ("events", {"limit": 100_001}, "limit"),
    ("events", {"limit": -1}, "limit"),
    ("events", {"limit": 1.5}, "limit"),
    (*run(env={"": "x"}), "env"),
    (*run(env={"A=B": "x"}), "env"),
    (*run(env={"A\0B": "x"}), "env"),
    (*run(env={"A": "x\0y"}), "env"),
    (*run(env={"A": "\udfff"}), "env"),
    (*run(env=["A=B"]), "env"),
    (*run(command=[]), "command"),
    (*run(command=["", "x"]), "command"),
    (*run(command=["python", "a\0b"]), "command"),
    (*run(command="python train.py"), "command"),
    (*run(gpus=0), "gpus"),
    (*run(gpus=1025), "gpus"),
    (*run(gpus=10**30), "gpus"),
    (*run(gpus=True), "gpus"),
    (*run(min_gpus=0), "min_gpus"),
    (*run(min_gpus=2000, gpus=1024), "min_gpus"),
    (*run(min_gpus=3, gpus=2), "min_gpus"),
    (*run(max_restarts=-1), "max_restarts"),
    (*run(max_restarts=10_001), "max_restarts"),
    (*run(workdir="relative/dir"), "workdir"),
    (*run(workdir="/tmp\0/x"), "workdir"),
    (*run(workdir="/" + "d" * 5000), "workdir"),
    (*run(checkpoint="last\0.pt"), "checkpoint"),
    ("exclude", {"gpu": "0\n"}, "gpu"),
    ("exclude", {"gpu": "0", "reason": "fan\nXid 79 on every GPU"}, "reason"),
    ("exclude", {"gpu": "0", "reason": "r" * 2000}, "reason"),
    ("include", {"gpu": ""}, "gpu"),
    ("reset", {"gpu": "0 1"}, "gpu"),
    ("inject", {"gpu": "0", "fault": "xid\n", "value": "79"}, "fault"),
    ("inject", {"gpu": "0", "fault": "xid", "value": "79\n"}, "value"),
]


def exchange(path: Path, lines: list[bytes]) -> list[dict[str, Any]]:
    """Send raw lines on one connection; one reply each."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(path))
        conn.sendall(b"".join(lines))
        conn.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def raw(cmd: str, args: dict[str, Any]) -> bytes:
    """The request line as any client could write it (json.dumps escapes NUL and lone surrogates)."""
    return json.dumps({"v": 1, "cmd": cmd, "args": args}).encode() + b"\n"


def assert_refused(reply: dict[str, Any], cmd: str, field: str) -> None:
    assert reply["ok"] is False and reply["code"] == "bad_request", reply
    assert f"{cmd}: argument '{field}'" in reply["error"], reply


@pytest.fixture
def fake_socket(tmp_path: Path) -> Iterator[tuple[FakeController, Path]]:
    fake = FakeController()
    with capture_logs(), serving(tmp_path, fake) as (_, path):
        yield fake, path


@pytest.mark.parametrize(("cmd", "args", "field"), BAD, ids=[f"{c}-{f}-{i}" for i, (c, _, f) in enumerate(BAD)])
def test_a_bad_field_is_refused_by_name(fake_socket: tuple[FakeController, Path], cmd: str, args: dict[str, Any], field: str) -> None:
    fake, path = fake_socket
    (reply,) = exchange(path, [raw(cmd, args)])
    assert_refused(reply, cmd, field)
    assert fake.calls == []


def test_good_requests_still_pass(fake_socket: tuple[FakeController, Path]) -> None:
    fake, path = fake_socket
    good = [
        raw(*run(name="a.b_c-1", env={"PATH": "/usr/bin", "EMPTY": "", "A": "x=y"}, command=["python", ""], gpus=1024,
                 min_gpus=1, max_restarts=10_000, checkpoint="runs/last.pt")),  # fmt: skip
        raw("events", {"limit": 100_000, "gpu": "GPU-0a1b2c3d-0000-1111-2222-333344445555", "job": "train"}),
        raw("events", {"gpu": "00000000:3B:00.0"}),
        raw("rollback", {"name": "train", "snapshot": "20250101T000000Z-000001-0a1b2c3d"}),
        raw("exclude", {"gpu": "0", "reason": "fan: 4000 rpm, 'noisy' (ticket #12)"}),
    ]
    assert [r["ok"] for r in exchange(path, good)] == [True] * len(good)
    assert [c[0] for c in fake.calls] == ["run", "events", "events", "rollback", "exclude"]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    with running_daemon(tmp_path_factory.mktemp("door"), gpus=2) as d:
        yield d


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.e2e
def test_a_real_daemon_creates_nothing_for_a_bad_request(daemon: DaemonProc, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    bad = [(c, {**a, "workdir": str(work)} if c == "run" and a.get("workdir") == "/tmp" else a, f) for c, a, f in BAD]
    before = tree(daemon.tmp)
    replies = exchange(daemon.socket, [raw(c, a) for c, a, _ in bad])
    for (cmd, _, field), reply in zip(bad, replies, strict=True):
        assert_refused(reply, cmd, field)
    status = daemon.status()
    assert status["jobs"] == [] and all(g["state"] != "excluded" for g in status["gpus"])
    assert tree(daemon.tmp) - before <= {"daemon.log"} and list(work.iterdir()) == []
    assert not set(daemon.kinds()) & {"job_started", "gpu_excluded"}
    assert os.path.exists(daemon.socket)
