"""Fuzzing the control protocol: decode_request gives a Request or a
ProtocolError for any line, and a live ControlServer fed random bytes keeps
answering a valid status request."""

from __future__ import annotations

import json
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control import FakeController, serving
from gpuguard.control.client import request
from gpuguard.control.protocol import ProtocolError, Request, decode_request, encode_request

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=10,
)
COMMANDS = st.sampled_from(["status", "events", "check", "healthy", "snapshots", "exclude", "include", "reset", "inject", "run", "stop", "rollback", "nope", ""])
REQUESTS = st.fixed_dictionaries(
    {},
    optional={"v": st.one_of(st.just(1), JSON), "cmd": st.one_of(COMMANDS, JSON), "args": st.one_of(st.dictionaries(st.text(max_size=8), JSON, max_size=4), JSON)},
)
# lines a client might send: raw bytes, JSON of any shape, or request-shaped objects with odd fields
LINES = st.one_of(
    st.binary(max_size=200),
    JSON.map(lambda v: json.dumps(v).encode()),
    REQUESTS.map(lambda v: json.dumps(v).encode()),
)


def _decode(line: bytes) -> Request | ProtocolError:
    try:
        return decode_request(line)
    except ProtocolError as exc:
        return exc


@FUZZ
@given(LINES)
def test_decode_request_gives_a_request_or_a_protocol_error(line: bytes) -> None:
    outcome = _decode(line)
    assert isinstance(outcome, Request | ProtocolError)
    if isinstance(outcome, Request):
        assert isinstance(outcome.cmd, str) and outcome.cmd and isinstance(outcome.args, dict)


def test_deep_nesting_is_a_protocol_error() -> None:
    """Regression: json.loads recurses per level, so this raised RecursionError."""
    assert "nested too deeply" in str(_decode(b"[" * 100_000))


def _exchange(path: Path, payload: bytes) -> list[dict[str, Any]]:
    """Send payload, half-close, read every reply line until the server closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(5)
        conn.connect(str(path))
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


@pytest.fixture(scope="module")
def live_server() -> Iterator[Path]:
    """One server for every example, so what one example leaves behind meets the next."""
    with tempfile.TemporaryDirectory() as tmp, serving(Path(tmp), request_timeout_s=1.0) as (_, path):
        yield path


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(LINES, min_size=1, max_size=4), final_newline=st.booleans())
def test_random_bytes_never_crash_a_live_server(live_server: Path, lines: list[bytes], final_newline: bool) -> None:
    payload = b"\n".join(line.replace(b"\n", b" ") for line in lines) + (b"\n" if final_newline else b"")
    replies = _exchange(live_server, payload)
    complete = len(lines) if final_newline else len(lines) - 1
    assert len(replies) == complete  # one reply per complete line; a trailing partial line is dropped
    for reply in replies:
        assert reply["ok"] is True or reply["code"] in ("bad_request", "refused", "not_found", "failed")  # never "internal"
    assert request(live_server, "status", {})["daemon"]["backend"] == "simulated"


def test_a_server_answers_after_a_burst_of_garbage_connections() -> None:
    fake = FakeController()
    with tempfile.TemporaryDirectory() as tmp, serving(Path(tmp), fake, request_timeout_s=0.5) as (_, path):
        for payload in (b"\xff" * 70_000, b"{" * 60_000 + b"\n", b"\x00\n" * 1000, b'{"cmd": "status", "args": []}\n'):
            try:
                _exchange(path, payload)
            except (ConnectionResetError, BrokenPipeError):
                assert len(payload) > 64 * 1024  # an oversized request is answered and closed with input unread
        assert request(path, "status", {})["gpus"][0]["uuid"] == fake.gpus[0]["uuid"]
