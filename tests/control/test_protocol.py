from __future__ import annotations

import json

import pytest

from gpuguard.control.protocol import (
    ProtocolError,
    Request,
    decode_reply,
    decode_request,
    encode_error,
    encode_request,
    encode_result,
)


def test_request_round_trip_is_one_line() -> None:
    line = encode_request("events", {"limit": 5, "gpu": "GPU-é"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"v": 1, "cmd": "events", "args": {"limit": 5, "gpu": "GPU-é"}}
    assert decode_request(line.rstrip(b"\n")) == Request("events", {"limit": 5, "gpu": "GPU-é"})


def test_args_may_be_left_out() -> None:
    assert decode_request(b'{"cmd": "status"}') == Request("status", {})


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"hello", "not valid JSON"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"[1, 2]", "must be a JSON object, not list"),
        (b'{"v": 1}', "no 'cmd'"),
        (b'{"v": 1, "cmd": 3}', "'cmd' must be a non-empty string"),
        (b'{"v": 1, "cmd": ""}', "'cmd' must be a non-empty string"),
        (b'{"v": 1, "cmd": "status", "args": [1]}', "'args' must be a JSON object"),
        (b'{"v": 2, "cmd": "status"}', "unsupported protocol version 2"),
        (b'{"v": 1, "cmd": "status", "extra": 1}', "unknown request field(s): extra"),
    ],
)
def test_bad_requests_say_what_is_wrong(line: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message.replace("(", r"\(").replace(")", r"\)")):
        decode_request(line)


def test_replies() -> None:
    ok = decode_reply(encode_result({"a": [1]}).rstrip(b"\n"))
    assert ok.ok and ok.result == {"a": [1]}
    err = decode_reply(encode_error("no such GPU", "not_found"))
    assert (err.ok, err.error, err.code) == (False, "no such GPU", "not_found")
    assert json.loads(encode_error("x", "made-up"))["code"] == "internal"
    with pytest.raises(ProtocolError):
        decode_reply(b'{"result": 1}')


def test_a_result_that_is_not_json_is_refused() -> None:
    with pytest.raises((TypeError, ValueError)):
        encode_result({"x": object()})
    with pytest.raises(ValueError):
        encode_result(float("nan"))
