"""The control socket's wire form: one JSON object per line, both ways.

Request: `{"v": 1, "cmd": "status", "args": {...}}`.
Reply: `{"ok": true, "result": ...}` or
`{"ok": false, "error": "text", "code": "bad_request" | "refused" | "not_found" | "failed" | "internal" | "busy"}`.

Stdlib only, so the client side imports nothing beyond it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

VERSION = 1
MAX_REQUEST_BYTES = 64 * 1024  # one request line, newline included
ERROR_CODES = ("bad_request", "refused", "not_found", "failed", "internal", "busy")


class ProtocolError(ValueError):
    """A request or reply that does not follow the wire form (code `bad_request`)."""


@dataclass(frozen=True, slots=True)
class Request:
    cmd: str
    args: dict[str, Any] = field(default_factory=dict)


def encode_request(cmd: str, args: dict[str, Any] | None = None) -> bytes:
    """One request line."""
    return _line({"v": VERSION, "cmd": cmd, "args": args or {}})


def decode_request(line: bytes) -> Request:
    """Parse one request line; ProtocolError says what is wrong with it."""
    obj = _object(line, "request")
    version = obj.get("v", VERSION)
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version!r} (this daemon speaks {VERSION})")
    cmd = obj.get("cmd")
    if cmd is None:
        raise ProtocolError("request has no 'cmd'")
    if not isinstance(cmd, str) or not cmd:
        raise ProtocolError("'cmd' must be a non-empty string")
    args = obj.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ProtocolError("'args' must be a JSON object")
    unknown = sorted(set(obj) - {"v", "cmd", "args"})
    if unknown:
        raise ProtocolError(f"unknown request field(s): {', '.join(unknown)}")
    return Request(cmd, args)


def encode_result(result: Any) -> bytes:
    """A success reply line; TypeError/ValueError when `result` is not JSON-able."""
    return _line({"ok": True, "result": result})


def encode_error(message: str, code: str) -> bytes:
    """An error reply line."""
    if code not in ERROR_CODES:
        code = "internal"
    return _line({"ok": False, "error": message, "code": code})


@dataclass(frozen=True, slots=True)
class Reply:
    ok: bool
    result: Any = None
    error: str = ""
    code: str = ""


def decode_reply(line: bytes) -> Reply:
    """Parse one reply line; ProtocolError when it is not a reply."""
    obj = _object(line, "reply")
    ok = obj.get("ok")
    if ok is True:
        return Reply(True, result=obj.get("result"))
    if ok is False:
        error, code = obj.get("error"), obj.get("code")
        if not isinstance(error, str) or not isinstance(code, str):
            raise ProtocolError("error reply without a string 'error' and 'code'")
        return Reply(False, error=error, code=code)
    raise ProtocolError("reply has no boolean 'ok'")


def _line(obj: dict[str, Any]) -> bytes:
    # allow_nan=False: NaN is not JSON, and other readers (jq) reject it
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8") + b"\n"


def _object(line: bytes, what: str) -> dict[str, Any]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not valid UTF-8") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"{what} is not valid JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:  # json.loads recurses once per nesting level
        raise ProtocolError(f"{what} is nested too deeply") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} must be a JSON object, not {type(obj).__name__}")
    return obj
