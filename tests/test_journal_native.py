"""journald's native protocol, written by gpuguard.logs without python-systemd.

Each test binds a datagram socket in tmp_path where journald's would be and
parses what arrives by systemd's docs/JOURNAL_NATIVE_PROTOCOL.md.
"""

from __future__ import annotations

import collections
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import struct
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import TextIO

import pytest
import structlog

from gpuguard import logs
from gpuguard.daemon.service import Daemon
from gpuguard.events import Event, EventKind
from gpuguard.health.types import Severity

CATALOG = Path(__file__).parents[1] / "systemd" / "gpuguard.catalog"


def parse(data: bytes) -> list[tuple[str, str]]:
    """A native-protocol entry: `FIELD=value\\n`, or `FIELD\\n` + u64 LE length + value + `\\n`."""
    fields, i = [], 0
    while i < len(data):
        end = data.index(b"\n", i)
        line = data[i:end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            i = end + 1
        else:
            key, (size,) = line, struct.unpack_from("<Q", data, end + 1)
            start = end + 9
            value, i = data[start : start + size], start + size
            assert data[i : i + 1] == b"\n", "a length-prefixed value ends with a newline"
            i += 1
        assert re.fullmatch(rb"[A-Z0-9][A-Z0-9_]*", key), key
        fields.append((key.decode(), value.decode()))
    return fields


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    """A datagram socket standing in for /run/systemd/journal/socket."""
    path = tmp_path / "journal.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5.0)
        yield path, sock


@pytest.fixture
def stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TextIO]:
    """The process's stderr as systemd connects it: JOURNAL_STREAM names it."""
    with (tmp_path / "stderr").open("w") as out:
        st = os.fstat(out.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        yield out


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()
    root.handlers, root.level = handlers, level


def lines(stream: TextIO) -> list[str]:
    stream.flush()
    return Path(stream.name).read_text().splitlines()


def received(sock: socket.socket) -> dict[str, str]:
    return dict(parse(sock.recv(1 << 20)))


# --- the wire format -------------------------------------------------------


def test_encode_uses_the_binary_form_only_for_values_with_a_newline() -> None:
    data = logs.encode([("MESSAGE", "two\nlines"), ("XID", "79"), ("EMPTY", "")])
    assert data == b"MESSAGE\n" + struct.pack("<Q", 9) + b"two\nlines\nXID=79\nEMPTY=\n"
    assert parse(data) == [("MESSAGE", "two\nlines"), ("XID", "79"), ("EMPTY", "")]


def test_writer_sends_one_datagram_per_entry(journal: tuple[Path, socket.socket]) -> None:
    path, sock = journal
    writer = logs.JournalWriter.open(path)
    assert writer is not None
    try:
        writer.send([("MESSAGE", "Xid 79\nGPU has fallen off the bus"), ("PRIORITY", "3"), ("XID", "79")])
        writer.send([("MESSAGE", "second")])
    finally:
        writer.close()
    assert parse(sock.recv(65536)) == [("MESSAGE", "Xid 79\nGPU has fallen off the bus"), ("PRIORITY", "3"), ("XID", "79")]
    assert parse(sock.recv(65536)) == [("MESSAGE", "second")]


def test_an_entry_too_large_for_a_datagram_goes_in_a_sealed_memfd(journal: tuple[Path, socket.socket]) -> None:
    path, sock = journal
    writer = logs.JournalWriter(path)
    limit = writer._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)  # a datagram's limit (wmem_max caps it)
    big = "x" * limit + "\nend"
    try:
        writer.send([("MESSAGE", big), ("PRIORITY", "6")])
    finally:
        writer.close()
    payload, fds, _flags, _addr = socket.recv_fds(sock, 1024, 4)
    assert payload == b"" and len(fds) == 1, "an empty payload with exactly one fd"
    fd = fds[0]
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & (fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL) == (
            fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        )
        data = os.pread(fd, os.fstat(fd).st_size, 0)  # journald maps it from the start
        assert parse(data) == [("MESSAGE", big), ("PRIORITY", "6")]
    finally:
        os.close(fd)


def test_open_needs_a_listening_socket(tmp_path: Path) -> None:
    assert logs.JournalWriter.open(tmp_path / "absent") is None
    (tmp_path / "file").write_text("")
    assert logs.JournalWriter.open(tmp_path / "file") is None
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "dead"))
    assert logs.JournalWriter.open(tmp_path / "dead") is None  # the socket file left behind, nobody listening


def test_message_ids_are_stable_uuid5_hex() -> None:
    assert logs.message_id("xid") == uuid.uuid5(logs.MESSAGE_ID_NAMESPACE, "xid").hex
    assert logs.message_id(EventKind.XID) == logs.message_id("xid")
    assert re.fullmatch(r"[0-9a-f]{32}", logs.message_id("xid"))
    assert len({logs.message_id(kind) for kind in EventKind}) == len(EventKind)


# --- logging through it -------------------------------------------------------


def test_under_journald_records_carry_journal_fields(journal: tuple[Path, socket.socket], stream: TextIO) -> None:
    path, sock = journal
    logs.configure("info", "auto", stream, journal_socket=path)
    structlog.contextvars.bind_contextvars(job="train-1")
    structlog.get_logger("gpuguard.test").error(
        "Xid 79 on GPU 0", kind="xid", gpu_uuid="GPU-1", gpu_index=0, xid=79, pci_bus_id=None
    )
    structlog.contextvars.clear_contextvars()
    fields = received(sock)
    assert (fields["PRIORITY"], fields["SYSLOG_IDENTIFIER"]) == ("3", "gpuguardd")
    assert (fields["GPU_UUID"], fields["GPU_INDEX"], fields["XID"], fields["JOB"]) == ("GPU-1", "0", "79", "train-1")
    assert fields["EVENT_KIND"] == "xid" and fields["MESSAGE_ID"] == logs.message_id("xid")
    assert "PCI_BUS_ID" not in fields
    assert json.loads(fields["MESSAGE"])["event"] == "Xid 79 on GPU 0"
    assert fields["CODE_FILE"] == __file__ and fields["CODE_FUNC"] == "test_under_journald_records_carry_journal_fields"
    assert fields["LOGGER"] == "gpuguard.test"
    assert lines(stream) == [], "nothing doubled on stderr"


def test_a_traceback_travels_as_one_multiline_message(journal: tuple[Path, socket.socket], stream: TextIO) -> None:
    path, sock = journal
    logs.configure("info", "auto", stream, journal_socket=path)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("somelib").exception("failed\nbadly")
    fields = received(sock)
    assert fields["PRIORITY"] == "3" and "MESSAGE_ID" not in fields and fields["LOGGER"] == "somelib"
    message = json.loads(fields["MESSAGE"])
    assert message["event"] == "failed\nbadly" and "RuntimeError: boom" in message["exception"]


def test_a_daemon_event_is_found_by_its_fields(journal: tuple[Path, socket.socket], stream: TextIO) -> None:
    """Daemon.record, as for an Xid from the kernel log: `journalctl XID=79` finds it."""
    path, sock = journal
    logs.configure("info", "auto", stream, journal_socket=path)
    daemon = SimpleNamespace(
        store=SimpleNamespace(append=lambda event: event),
        lock=threading.RLock(),
        _xid_counts=collections.Counter(),
        monitor=SimpleNamespace(tracks={"GPU-7": SimpleNamespace(info=SimpleNamespace(index=3))}),
    )
    event = Event(kind=EventKind.XID, severity=Severity.CRITICAL, message="Xid 79: GPU has fallen off the bus",
                  gpu="GPU-7", job="yolo", xid=79, data={"pci_bus_id": "00000000:3B:00.0"})  # fmt: skip
    Daemon.record(daemon, event)  # type: ignore[arg-type]
    fields = received(sock)
    assert fields["PRIORITY"] == "2"
    assert (fields["XID"], fields["GPU_UUID"], fields["GPU_INDEX"], fields["JOB"]) == ("79", "GPU-7", "3", "yolo")
    assert (fields["EVENT_KIND"], fields["PCI_BUS_ID"]) == ("xid", "00000000:3B:00.0")
    assert fields["MESSAGE_ID"] == logs.message_id("xid")


def test_without_the_socket_lines_keep_their_priority_prefix(tmp_path: Path, stream: TextIO) -> None:
    logs.configure("info", "auto", stream, journal_socket=tmp_path / "absent")
    structlog.get_logger("gpuguard.test").error("e", xid=79)
    (line,) = lines(stream)
    assert line.startswith("<3>{") and json.loads(line[3:])["xid"] == 79


def test_a_send_journald_refuses_goes_to_stderr(journal: tuple[Path, socket.socket], stream: TextIO) -> None:
    path, sock = journal
    logs.configure("info", "auto", stream, journal_socket=path)
    sock.close()  # journald went away after start-up
    path.unlink()
    structlog.get_logger("gpuguard.test").warning("w")
    (line,) = lines(stream)
    assert line.startswith("<4>") and json.loads(line[3:])["event"] == "w"


def test_outside_journald_the_socket_is_not_used(
    journal: tuple[Path, socket.socket], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon started by hand on a systemd host logs to its terminal, not the journal."""
    path, sock = journal
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    with (tmp_path / "out").open("w") as out:
        logs.configure("info", "json", out, journal_socket=path)
        structlog.get_logger("gpuguard.test").error("e")
        out.flush()
        assert json.loads(Path(out.name).read_text())["event"] == "e"
    sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        sock.recv(65536)


# --- the catalog ---------------------------------------------------------------


def catalog_entries() -> dict[str, str]:
    text = CATALOG.read_text()
    parts = re.split(r"^-- ([0-9a-f]{32})\n", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_the_catalog_explains_every_event_kind() -> None:
    entries = catalog_entries()
    assert set(entries) == {logs.message_id(kind) for kind in EventKind}
    for kind in EventKind:
        body = entries[logs.message_id(kind)]
        assert re.search(r"^Subject: \S", body, re.MULTILINE), kind
        assert re.search(r"^Defined-By: gpuguard$", body, re.MULTILINE), kind
        assert body.split("\n\n", 1)[1].strip(), f"{kind}: no explanation"


def test_journalctl_reads_the_catalog(tmp_path: Path) -> None:
    if shutil.which("journalctl") is None:
        pytest.skip("journalctl not installed")
    catalog_dir = tmp_path / "usr" / "lib" / "systemd" / "catalog"
    catalog_dir.mkdir(parents=True)
    shutil.copy(CATALOG, catalog_dir)
    subprocess.run(["journalctl", f"--root={tmp_path}", "--update-catalog"], check=True, timeout=60)
    listed = subprocess.run(
        ["journalctl", f"--root={tmp_path}", "--list-catalog"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert {line.split()[0] for line in listed.splitlines() if line.strip()} == {
        logs.message_id(kind) for kind in EventKind
    }
