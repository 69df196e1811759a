from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gpuguard.control.client import CommandFailed, request
from gpuguard.control.limits import Limits
from gpuguard.control.protocol import MAX_REQUEST_BYTES, encode_request
from gpuguard.control.server import ControlServer, ControlServerError

from . import UUID0, FakeController, serving


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5.0)
    sock.connect(str(path))
    return sock


def read_reply(sock: socket.socket) -> dict[str, Any]:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(1)  # one byte at a time: never eat into the next reply
        assert chunk, f"connection closed after {buf!r}"
        buf += chunk
    return json.loads(buf)


def closed(sock: socket.socket) -> bool:
    """True at EOF; a reset (the server closed with our bytes unread) counts too."""
    try:
        return sock.recv(10) == b""
    except ConnectionResetError:
        return True


def test_every_command_round_trips(tmp_path: Path) -> None:
    fake = FakeController()
    with serving(tmp_path, fake) as (_, path):
        assert request(path, "status", {})["jobs"][0]["name"] == "train"
        assert [e["kind"] for e in request(path, "events", {"limit": 1})] == ["xid"]
        assert request(path, "check", {}) == fake.verdict
        assert request(path, "healthy", {}) == [{"index": 0, "uuid": UUID0}]
        assert request(path, "snapshots", {"name": "train"})[0]["id"] == "s2"
        assert request(path, "exclude", {"gpu": "0", "reason": "flaky"})["reason"] == "flaky"
        assert request(path, "include", {"gpu": UUID0})["changed"] is True
        assert request(path, "inject", {"gpu": "0", "fault": "xid", "value": "79"})["injected"] == "xid 79"
        spec = {"name": "train", "command": ["python", "t.py"], "gpus": 2, "env": {"A": "b"}}
        assert request(path, "run", spec)["state"] == "starting"
        assert request(path, "stop", {"name": "train"})["state"] == "stopping"
        assert request(path, "rollback", {"name": "train"})["snapshot"] == "s1"
    names = [c[0] for c in fake.calls]
    assert names == ["status", "events", "check", "healthy", "snapshots", "exclude", "include", "inject", "run", "stop", "rollback"]
    peer = fake.calls[5][2]
    assert peer is not None and (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert fake.calls[8][1][0]["gpus"] == 2 and fake.calls[8][1][0]["env"] == {"A": "b"}


def test_errors_carry_their_code(tmp_path: Path) -> None:
    with serving(tmp_path) as (_, path):
        for cmd, args, code in [
            ("exclude", {"gpu": "7"}, "not_found"),
            ("reset", {"gpu": "0"}, "failed"),
            ("inject", {"gpu": "0", "fault": "melt"}, "bad_request"),
            ("frobnicate", {}, "bad_request"),
            ("events", {"limit": "x"}, "bad_request"),
        ]:
            with pytest.raises(CommandFailed) as info:
                request(path, cmd, args)
            assert info.value.code == code, (cmd, info.value.message)
        with pytest.raises(CommandFailed, match="no GPU '7' on this node"):
            request(path, "exclude", {"gpu": "7"})


def test_a_controller_bug_is_internal_logged_and_the_server_keeps_serving(tmp_path: Path) -> None:
    with serving(tmp_path) as (_, path), capture_logs() as logs:
        with pytest.raises(CommandFailed) as info:
            request(path, "inject", {"gpu": "0", "fault": "explode"})
        assert info.value.code == "internal" and "RuntimeError" in info.value.message
        assert request(path, "check", {})["status"] == "healthy"
    failed = [e for e in logs if e["event"] == "control command failed"]
    assert failed and failed[0]["cmd"] == "inject" and failed[0]["exc_info"] is True
    assert failed[0]["log_level"] == "error"


def test_garbage_and_non_utf8_get_an_error_and_the_connection_goes_on(tmp_path: Path) -> None:
    with serving(tmp_path) as (_, path), connect(path) as sock:
        sock.sendall(b"hello there\n")
        reply = read_reply(sock)
        assert reply["ok"] is False and reply["code"] == "bad_request" and "not valid JSON" in reply["error"]
        sock.sendall(b"\xff\xfe\x00\n")
        assert "not valid UTF-8" in read_reply(sock)["error"]
        sock.sendall(b"[]\n")
        assert "must be a JSON object" in read_reply(sock)["error"]
        sock.sendall(encode_request("check") + encode_request("healthy"))  # two in one write
        assert read_reply(sock)["result"]["status"] == "healthy"
        assert read_reply(sock)["result"] == [{"index": 0, "uuid": UUID0}]


def test_an_oversized_request_is_refused_and_closed(tmp_path: Path) -> None:
    with serving(tmp_path) as (_, path):
        with connect(path) as sock:
            try:
                sock.sendall(b"x" * (MAX_REQUEST_BYTES + 4096))
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server may close before taking it all
            reply = read_reply(sock)
            assert reply == {"ok": False, "error": f"request too large (limit {MAX_REQUEST_BYTES} bytes)", "code": "bad_request"}
            assert closed(sock)
        with connect(path) as sock:  # a long line that ends in a newline, over the limit
            big = encode_request("events", {"job": "j" * MAX_REQUEST_BYTES})
            try:
                sock.sendall(big)
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert read_reply(sock)["error"].startswith("request too large")
        assert request(path, "check", {})["status"] == "healthy"


def test_a_half_closed_request_is_dropped_quietly(tmp_path: Path) -> None:
    with serving(tmp_path) as (_, path):
        with connect(path) as sock:
            sock.sendall(b'{"v": 1, "cmd": "sta')
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(100) == b""
        with connect(path) as sock:  # a complete request, then half-close: answered
            sock.sendall(encode_request("check"))
            sock.shutdown(socket.SHUT_WR)
            assert read_reply(sock)["ok"] is True
            assert sock.recv(100) == b""
        assert request(path, "status", {})["daemon"]["backend"] == "simulated"


def test_a_stalled_client_never_blocks_others_and_is_dropped(tmp_path: Path) -> None:
    request_timeout_s = 5.0  # the margin between the answers and the drop is for a loaded machine
    with serving(tmp_path, request_timeout_s=request_timeout_s) as (_, path):
        with connect(path) as silent, connect(path) as trickle:
            trickle.sendall(b'{"v": 1,')
            started = time.monotonic()
            for _ in range(5):
                assert request(path, "check", {}, timeout_s=request_timeout_s)["status"] == "healthy"
            answered = time.monotonic() - started
            assert answered < request_timeout_s / 2, answered  # well before the stalled ones are dropped
            for sock in (silent, trickle):
                sock.settimeout(request_timeout_s * 3)  # connect()'s 5 s would end the wait before the drop
            assert silent.recv(10) == b""  # dropped at its deadline, without a reply
            assert trickle.recv(10) == b""
            assert time.monotonic() - started < request_timeout_s * 3


class BarrierController(FakeController):
    """check() returns only once `parties` calls are in flight together."""

    def __init__(self, parties: int) -> None:
        super().__init__()
        self.barrier = threading.Barrier(parties, timeout=10)

    def check(self) -> dict[str, Any]:
        self.barrier.wait()
        return super().check()


def test_fifty_concurrent_clients(tmp_path: Path) -> None:
    with serving(tmp_path, BarrierController(50)) as (_, path):
        with ThreadPoolExecutor(50) as pool:
            results = list(pool.map(lambda _: request(path, "check", {}, timeout_s=15.0), range(50)))
    assert [r["status"] for r in results] == ["healthy"] * 50


def quick_lane_reply(path: Path, line: bytes) -> dict[str, Any]:
    """The quick lane's reply to `line`, once the lane is free again (the previous quick
    connection frees its slot a moment after the client sees the close)."""
    deadline = time.monotonic() + 5
    while True:
        with connect(path) as quick:
            quick.sendall(line)
            reply = read_reply(quick)
        if "too many control connections" not in reply.get("error", "") or time.monotonic() > deadline:
            return reply
        time.sleep(0.02)


@contextlib.contextmanager
def holding_the_quick_lane(path: Path) -> Iterator[socket.socket]:
    """A connection admitted to the quick lane and kept there (half a request line): one
    refused while the lane's last slot was still being freed is tried again."""
    deadline = time.monotonic() + 5
    while True:
        conn = connect(path)
        conn.sendall(b"{")
        conn.settimeout(0.3)
        try:
            conn.recv(1)  # a reply (busy) or a close: not admitted
            refused = True
        except TimeoutError:
            refused = False  # admitted: it waits for the rest of its line
        if not refused:
            break
        conn.close()
        assert time.monotonic() < deadline, "the quick lane never came free"
        time.sleep(0.02)
    try:
        yield conn
    finally:
        conn.close()


def test_beyond_the_limits_the_answer_is_busy(tmp_path: Path) -> None:
    limits = Limits(total=2, per_uid=2, root_reserved=0, quick=1, quick_per_uid=1)
    # a and b hold the full lane for the whole test: their first-line deadline must not free it
    with serving(tmp_path, limits=limits, request_timeout_s=30) as (_, path):
        with connect(path) as a, connect(path) as b:
            a.sendall(b"{")
            b.sendall(b"{")
            with connect(path) as quick:  # the full lane is taken: the quick lane answers one check, then closes
                quick.sendall(encode_request("check") + encode_request("check"))
                assert read_reply(quick)["result"]["status"] == "healthy"
                assert closed(quick)
            # a closed connection frees its slot a moment after the client sees the close: request()
            # tries a "busy" answer again meanwhile
            assert request(path, "status", {}, busy_retry_s=5)["daemon"]["backend"] == "simulated"
            reply = quick_lane_reply(path, encode_request("exclude", {"gpu": "0"}))  # ... and nothing that changes anything
            assert reply.get("code") == "busy" and "only check and status are answered now" in reply["error"], reply
            with holding_the_quick_lane(path):  # both lanes taken: busy at once
                with pytest.raises(CommandFailed) as info:
                    request(path, "status", {}, busy_retry_s=0)
                assert info.value.code == "busy" and "too many control connections" in info.value.message
        assert request(path, "check", {}, busy_retry_s=5)["status"] == "healthy"  # the slots come free once their threads see the close


def test_a_busy_answer_is_tried_again_until_a_slot_frees_and_given_up_on_when_none_does(tmp_path: Path) -> None:
    """"busy" means not carried out: request() sends it again (with back-off) for busy_retry_s, so a
    client's own connection churn near the limits is no failure; a daemon that stays full still is."""
    limits = Limits(total=1, per_uid=1, root_reserved=0, quick=0, quick_per_uid=0)
    controller = FakeController()
    with serving(tmp_path, controller, limits=limits, request_timeout_s=30) as (_, path):
        held = connect(path)
        held.sendall(b"{")  # the one slot, until it is closed
        started = time.monotonic()
        with pytest.raises(CommandFailed) as info:
            request(path, "exclude", {"gpu": "0"}, busy_retry_s=0.3)
        assert info.value.code == "busy" and time.monotonic() - started >= 0.1  # tried more than once
        assert [c for c in controller.calls if c[0] == "exclude"] == []  # and never carried out
        threading.Timer(0.3, held.close).start()
        assert request(path, "exclude", {"gpu": "0"}, busy_retry_s=10)["gpu"] == UUID0
        assert [c[1][0] for c in controller.calls if c[0] == "exclude"] == ["0"]  # once


def test_a_quick_lane_client_gets_a_short_deadline(tmp_path: Path) -> None:
    limits = Limits(total=1, per_uid=1, root_reserved=0, quick=1, quick_per_uid=1, quick_timeout_s=0.3)
    with serving(tmp_path, limits=limits, request_timeout_s=30) as (_, path):
        with connect(path) as held, connect(path) as quick:
            held.sendall(b"{")
            started = time.monotonic()
            assert quick.recv(10) == b""  # dropped without a reply at the quick deadline, not after 30 s
            assert time.monotonic() - started < 5


def test_socket_mode_group_and_no_leftovers(tmp_path: Path) -> None:
    gid = os.getgid() if os.getuid() != 0 else 65534
    with serving(tmp_path, mode=0o640, group_gid=gid) as (_, path):
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == gid
        assert sorted(p.name for p in tmp_path.iterdir()) == ["gpuguard.sock"]
    assert list(tmp_path.iterdir()) == []  # stop removes it


def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "gpuguard.sock"
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(str(path))
    old.close()  # the file stays, nobody listens: stale
    with serving(tmp_path) as (_, served):
        assert served == path and request(path, "check", {})["status"] == "healthy"


def test_a_live_socket_refuses_start(tmp_path: Path) -> None:
    with serving(tmp_path) as (_, path):
        second = ControlServer(path, FakeController(), admin_gid=None)
        with pytest.raises(ControlServerError, match="already answering"):
            second.start()
        assert request(path, "check", {})["status"] == "healthy"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["gpuguard.sock"]


@pytest.mark.parametrize("kind", ["symlink", "file", "dangling symlink"])
def test_something_else_at_the_path_refuses_start(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "gpuguard.sock"
    target = tmp_path / "precious"
    if kind == "file":
        path.write_text("keep me")
    else:
        if kind == "symlink":
            target.write_text("keep me")
        path.symlink_to(target)
    server = ControlServer(path, FakeController(), admin_gid=None)
    with pytest.raises(ControlServerError, match="refusing to replace it"):
        server.start()
    assert path.is_symlink() == (kind != "file")
    if kind != "dangling symlink":
        assert path.read_text() == "keep me"


def test_unsafe_directories_refuse_start(tmp_path: Path) -> None:
    def start(directory: Path) -> None:
        server = ControlServer(directory / "gpuguard.sock", FakeController(), admin_gid=None)
        server.start()
        server.stop()

    with pytest.raises(ControlServerError, match="does not exist"):
        start(tmp_path / "missing")
    with pytest.raises(ControlServerError, match="too long for a Unix socket path"):
        start(tmp_path / ("d" * 120))
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(ControlServerError, match="is a symlink"):
        start(tmp_path / "link")
    real.chmod(0o777)
    with pytest.raises(ControlServerError, match="world-writable without the sticky bit"):
        start(real)
    real.chmod(0o1777)
    start(real)  # like /tmp: fine


def test_stop_leaves_a_socket_that_is_no_longer_ours(tmp_path: Path) -> None:
    server = ControlServer(tmp_path / "gpuguard.sock", FakeController(), admin_gid=None)
    server.start()
    (tmp_path / "gpuguard.sock").unlink()
    (tmp_path / "gpuguard.sock").write_text("someone else's")
    server.stop()
    server.stop()  # twice is harmless
    assert (tmp_path / "gpuguard.sock").read_text() == "someone else's"
