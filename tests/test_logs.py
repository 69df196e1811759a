"""gpuguard.logs: one processor chain, JSON lines, journald priority prefixes."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest
import structlog

from gpuguard import logs


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Leave structlog and the root logger as the test found them."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    structlog.contextvars.clear_contextvars()
    yield
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()
    root.handlers, root.level = handlers, level


@pytest.fixture
def stream(tmp_path: Path) -> Iterator[TextIO]:
    with (tmp_path / "log").open("w") as out:
        yield out


def lines(stream: TextIO) -> list[str]:
    stream.flush()
    return Path(stream.name).read_text().splitlines()


def test_json_lines_carry_level_event_timestamp_and_bound_fields(stream: TextIO) -> None:
    logs.configure("info", "json", stream)
    structlog.contextvars.bind_contextvars(job="train-1")
    structlog.get_logger("gpuguard.test").bind(gpu_uuid="GPU-1").warning("xid_seen", xid=79)
    logging.getLogger("somelib").error("plain %s", "stdlib")
    first, second = (json.loads(line) for line in lines(stream))
    assert first["event"] == "xid_seen" and first["level"] == "warning"
    assert (first["gpu_uuid"], first["xid"], first["job"]) == ("GPU-1", 79, "train-1")
    assert first["logger"] == "gpuguard.test"
    assert first["timestamp"].endswith("Z")
    assert second["event"] == "plain stdlib" and second["level"] == "error"
    assert second["logger"] == "somelib" and second["job"] == "train-1"
    assert "timestamp" in second


def test_level_filters(stream: TextIO) -> None:
    logs.configure("warning", "json", stream)
    log = structlog.get_logger("gpuguard.test")
    log.info("quiet")
    log.warning("loud")
    assert [json.loads(line)["event"] for line in lines(stream)] == ["loud"]


def test_exceptions_are_rendered_into_the_line(stream: TextIO) -> None:
    logs.configure("info", "json", stream)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        structlog.get_logger("gpuguard.test").error("failed", exc_info=True)
    (line,) = lines(stream)
    assert "RuntimeError: boom" in json.loads(line)["exception"]


def test_journal_stream_prefixes_each_line_with_its_priority(
    stream: TextIO, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without journald's native socket (tests/test_journal_native.py has it)."""
    st = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert logs.under_journald(stream)
    logs.configure("debug", "auto", stream, journal_socket=tmp_path / "no-journald")
    log = structlog.get_logger("gpuguard.test")
    log.critical("c")
    log.error("e")
    log.warning("w")
    log.info("i")
    logging.getLogger("somelib").error("stdlib")
    out = lines(stream)
    assert [line[:3] for line in out] == ["<2>", "<3>", "<4>", "<6>", "<3>"]
    assert [json.loads(line[3:])["event"] for line in out] == ["c", "e", "w", "i", "stdlib"]


def test_journal_stream_of_another_file_gives_no_prefix(stream: TextIO, monkeypatch: pytest.MonkeyPatch) -> None:
    st = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
    assert not logs.under_journald(stream)
    logs.configure("info", "json", stream)
    structlog.get_logger("gpuguard.test").error("e")
    (line,) = lines(stream)
    assert line.startswith("{") and json.loads(line)["event"] == "e"


def test_no_journal_stream_gives_no_prefix(stream: TextIO) -> None:
    assert not logs.under_journald(stream)
    logs.configure("info", "auto", stream)  # not a TTY, so JSON
    structlog.get_logger("gpuguard.test").error("e")
    (line,) = lines(stream)
    assert json.loads(line)["event"] == "e"


@pytest.mark.parametrize("value", ["", "garbage", "1:2:3", "x:y"])
def test_malformed_journal_stream_is_not_journald(stream: TextIO, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", value)
    assert not logs.under_journald(stream)


@pytest.mark.parametrize(
    ("level", "prio"),
    [
        (logging.CRITICAL, 2),
        (logging.ERROR, 3),
        (logging.WARNING, 4),
        (logging.INFO, 6),
        (logging.DEBUG, 7),
        (logging.ERROR + 5, 3),  # between levels rounds down
        (logging.NOTSET, 7),
        (logging.CRITICAL + 10, 2),
    ],
)
def test_priority(level: int, prio: int) -> None:
    assert logs.priority(level) == prio
