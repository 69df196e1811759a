"""What a well-formed control argument looks like, checked at the door.

Each validator returns what is wrong with a value (a phrase that follows the
argument's name: "must be ..."), or None when it is fine. Names and ids are
matched whole (fullmatch), so a trailing newline never slips through.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

from gpuguard.contract import valid_job_name

Validator = Callable[[Any], str | None]

MAX_PATH_BYTES = 4096  # PATH_MAX
MAX_LINE_CHARS = 1024

_GPU = re.compile(r"[A-Za-z0-9][A-Za-z0-9:._-]{0,95}")  # an index, a UUID or a PCI bus id
_SNAPSHOT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_FAULT = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")
_FAULT_VALUE = re.compile(r"[A-Za-z0-9_.+-]{1,64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def text_problem(value: str | list[str] | dict[str, str]) -> str | None:
    """The rule for every string of every request: no NUL (C strings end
    there), and encodable as the OS encodes names (JSON may carry lone
    surrogates; only the byte escapes of os.fsdecode are taken)."""
    strings = [value] if isinstance(value, str) else [*value, *value.values()] if isinstance(value, dict) else value
    for s in strings:
        if "\0" in s:
            return "must not contain a NUL character"
        try:
            s.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return "must be valid Unicode text (no lone surrogates)"
    return None


def matching(pattern: re.Pattern[str], what: str) -> Validator:
    return lambda value: None if pattern.fullmatch(value) else f"must be {what}"


gpu = matching(_GPU, "a GPU index, UUID or PCI bus id")
snapshot_id = matching(_SNAPSHOT, "a snapshot id")
fault = matching(_FAULT, "a fault's name")
fault_value = matching(_FAULT_VALUE, "a number or a word")


def job_name(value: str) -> str | None:
    if valid_job_name(value):
        return None
    return "must be a job name: letters, digits, '_', '.', '-', at most 64, starting with a letter or digit"


def one_line(value: str) -> str | None:
    """Free text that ends up in the event log: one line, bounded."""
    if len(value) > MAX_LINE_CHARS:
        return f"must be at most {MAX_LINE_CHARS} characters"
    return "must be one line without control characters" if _CONTROL.search(value) else None


def iso_time(value: str) -> str | None:
    """An ISO-8601 time with its UTC offset: without one, client and daemon
    might read it in different zones."""
    try:
        when = datetime.fromisoformat(value) if len(value) <= 64 else None
    except ValueError:
        when = None
    if when is None:
        return "must be an ISO-8601 time, e.g. 2025-01-31T12:00:00Z"
    return None if when.tzinfo is not None else "must be an ISO-8601 time with a UTC offset (Z or +HH:MM)"


def path(absolute: bool) -> Validator:
    def check(value: str) -> str | None:
        if len(value.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
            return f"must be at most {MAX_PATH_BYTES} bytes"
        if absolute and not os.path.isabs(value):
            return "must be an absolute path"
        return None

    return check


def argv(value: list[str]) -> str | None:
    return "must start with a non-empty program name" if not value[0] else None


def environment(value: dict[str, str]) -> str | None:
    for key in value:
        if not key or "=" in key:
            return f"has the bad variable name {key!r}: names are non-empty and without '='"
    return None
