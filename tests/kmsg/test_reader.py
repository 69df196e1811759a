"""The kernel-log reader on files, FIFOs and a record-per-read stand-in for
/dev/kmsg (a SOCK_SEQPACKET socket pair). Never opens the real /dev/kmsg."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gpuguard.kmsg import reader as reader_module
from gpuguard.kmsg.parser import PciMapping
from gpuguard.kmsg.reader import MAX_LINE_BYTES, KernelLogSource, KmsgDevice
from gpuguard.observations import XidObservation

BOOT = 1_700_000_000.0
XID79 = (
    "6,{seq},1000000,-;NVRM: Xid (PCI:0000:3b:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.\n"
)
XID13 = "6,{seq},2000000,-;NVRM: Xid (PCI:0000:5e:00): 13, Graphics Exception\n"
MAPPING = "6,{seq},500000,-;NVRM: GPU at PCI:0000:3b:00: GPU-509665ad-b600-ac93-3616-d754b23d636d\n"


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "kmsg"


@pytest.fixture
def sources() -> Iterator[list[KernelLogSource]]:
    opened: list[KernelLogSource] = []
    yield opened
    for source in opened:
        source.close()


def open_source(path: Path, sources: list[KernelLogSource]) -> KernelLogSource:
    source = KernelLogSource(path, boot_time=BOOT)
    sources.append(source)
    return source


def append(path: Path, text: str | bytes) -> None:
    with open(path, "ab") as f:
        f.write(text.encode() if isinstance(text, str) else text)


def xids(found: list[XidObservation | PciMapping]) -> list[tuple[int, bool]]:
    return [(f.xid, f.historical) for f in found if isinstance(f, XidObservation)]


def read_until(source: KernelLogSource, count: int, timeout_s: float = 2.0) -> list[XidObservation | PciMapping]:
    found: list[XidObservation | PciMapping] = []
    deadline = time.monotonic() + timeout_s
    while len(found) < count and time.monotonic() < deadline:
        found += source.read(0.05)
    return found


def test_existing_content_is_history_and_appended_lines_are_new(log_path: Path, sources: list[KernelLogSource]) -> None:
    log_path.write_text(MAPPING.format(seq=1) + XID79.format(seq=2))
    source = open_source(log_path, sources)
    found = source.read(0.5)
    assert found[0] == PciMapping(pci_bus_id="0000:3b:00", uuid="GPU-509665ad-b600-ac93-3616-d754b23d636d")
    assert xids(found) == [(79, True)]
    assert found[1].timestamp == BOOT + 1.0
    assert source.read(0.02) == []
    append(log_path, XID13.format(seq=3))
    assert xids(source.read(0.5)) == [(13, False)]


def test_records_user_space_wrote_are_not_read(log_path: Path, sources: list[KernelLogSource]) -> None:
    """What `echo ... > /dev/kmsg` or `logger --kmsg` writes has facility user (prio 8..15): not an Xid."""
    log_path.write_text("14" + XID79.format(seq=1)[1:] + "12" + XID79.format(seq=2)[1:] + XID13.format(seq=3))
    source = open_source(log_path, sources)
    assert xids(source.read(0.5)) == [(13, True)]


def test_appended_line_comes_back_quickly(log_path: Path, sources: list[KernelLogSource]) -> None:
    log_path.write_text("")
    source = open_source(log_path, sources)
    assert source.read(0.0) == []
    written: list[float] = []

    def writer() -> None:
        time.sleep(0.1)
        append(log_path, XID79.format(seq=1))
        written.append(time.monotonic())

    thread = threading.Thread(target=writer)
    thread.start()
    found = source.read(30.0)
    returned = time.monotonic()
    thread.join()
    assert xids(found) == [(79, False)]
    assert returned - written[0] < 15.0  # woken by the line, not by its 30 s timeout


def test_read_blocks_at_most_its_timeout(log_path: Path, sources: list[KernelLogSource]) -> None:
    log_path.write_text("")
    source = open_source(log_path, sources)
    started = time.monotonic()
    assert source.read(0.1) == []
    assert 0.09 <= time.monotonic() - started < 2.0  # bounded; the margin is for a loaded machine


def test_partial_line_waits_for_its_newline(log_path: Path, sources: list[KernelLogSource]) -> None:
    log_path.write_text("")
    source = open_source(log_path, sources)
    line = XID79.format(seq=1)
    append(log_path, line[:40])
    assert source.read(0.05) == []
    append(log_path, line[40:])
    assert xids(source.read(0.5)) == [(79, False)]


def test_truncated_file_is_read_from_its_start(log_path: Path, sources: list[KernelLogSource]) -> None:
    log_path.write_text(XID13.format(seq=1) * 5)
    source = open_source(log_path, sources)
    assert xids(source.read(0.5)) == [(13, True)] * 5
    log_path.write_text(XID79.format(seq=1))  # truncates, then one shorter line
    assert xids(read_until(source, 1)) == [(79, False)]


def test_replaced_file_is_followed(log_path: Path, tmp_path: Path, sources: list[KernelLogSource]) -> None:
    log_path.write_text(XID13.format(seq=1))
    source = open_source(log_path, sources)
    assert xids(source.read(0.5)) == [(13, True)]
    log_path.rename(tmp_path / "kmsg.1")
    assert source.read(0.05) == []  # gone for a moment: nothing, no error
    log_path.write_text(XID13.format(seq=2) * 3 + XID79.format(seq=5))
    assert xids(read_until(source, 4)) == [(13, False)] * 3 + [(79, False)]


def test_missing_file_is_waited_for_and_its_lines_are_new(log_path: Path, sources: list[KernelLogSource]) -> None:
    source = open_source(log_path, sources)
    assert source.read(0.05) == []
    log_path.write_text(XID79.format(seq=1))
    assert xids(read_until(source, 1)) == [(79, False)]


def test_garbage_long_and_binary_lines_do_not_stop_reading(log_path: Path, sources: list[KernelLogSource]) -> None:
    log_path.write_bytes(
        b"\xff\xfe\x00\x80 garbage\n"
        + b"\n\n"
        + b"6,1,2,-;NVRM: Xid (PCI:0000:3b:00): 79, " + b"z" * 100_000 + b"\n"
        + b"6,1,2,-;NVRM: \xc3\x28 bad utf-8\n"
        + XID13.format(seq=9).encode()
    )
    source = open_source(log_path, sources)
    found = read_until(source, 2)
    assert xids(found) == [(79, True), (13, True)]
    assert len(found[0].message) < MAX_LINE_BYTES


def test_over_long_line_without_newline_is_cut_not_waited_for(log_path: Path, sources: list[KernelLogSource]) -> None:
    log_path.write_text("")
    source = open_source(log_path, sources)
    append(log_path, "6,1,2,-;NVRM: Xid (PCI:0000:3b:00): 79, " + "z" * 20_000)
    assert xids(source.read(0.5)) == [(79, False)]
    append(log_path, "z" * 30_000 + "NVRM: Xid (PCI:0000:3b:00): 13, hidden in the cut-off tail\n")
    append(log_path, XID13.format(seq=2))
    assert [f.pci_bus_id for f in read_until(source, 1)] == ["0000:5e:00"]


def test_fifo_is_followed_without_blocking(tmp_path: Path, sources: list[KernelLogSource]) -> None:
    fifo = tmp_path / "kmsg.fifo"
    os.mkfifo(fifo)
    source = open_source(fifo, sources)
    started = time.monotonic()
    assert source.read(0.05) == []  # no writer yet: returns, does not block
    assert time.monotonic() - started < 2.0
    for seq in (1, 2):
        with open(fifo, "w") as writer:
            writer.write(XID79.format(seq=seq)[:30])
            writer.flush()
            assert source.read(0.05) == []
            writer.write(XID79.format(seq=seq)[30:])
            writer.flush()
            assert xids(read_until(source, 1)) == [(79, False)]
        started = time.monotonic()
        assert source.read(0.05) == []  # writer gone: no spin, no error
        assert time.monotonic() - started < 2.0


def test_character_device_that_ends_does_not_spin(sources: list[KernelLogSource]) -> None:
    source = open_source(Path("/dev/null"), sources)  # a char device: read as /dev/kmsg is
    started = time.monotonic()
    assert source.read(0.1) == []
    assert time.monotonic() - started >= 0.09


def test_close_ends_reading(log_path: Path) -> None:
    log_path.write_text(XID79.format(seq=1))
    source = KernelLogSource(log_path, boot_time=BOOT)
    source.close()
    assert source.read(0.05) == []
    source.close()


# --- /dev/kmsg: one record per read --------------------------------------


@pytest.fixture
def kmsg_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    yield ours, kernel
    kernel.close()
    ours.close()


def test_kmsg_records_before_the_first_eagain_are_history(kmsg_pair: tuple[socket.socket, socket.socket]) -> None:
    ours, kernel = kmsg_pair
    device = KmsgDevice(os.dup(ours.fileno()))
    try:
        kernel.send(MAPPING.format(seq=1).encode() + b" SUBSYSTEM=pci\n DEVICE=+pci:0000:3b:00.0\n")
        kernel.send(XID79.format(seq=2).encode())
        lines = device.poll(0.5)
        assert [historical for _, historical in lines] == [True, True]
        assert lines[0][0] == MAPPING.format(seq=1).rstrip("\n")
        assert device.poll(0.02) == []
        threading.Timer(0.05, kernel.send, args=(XID13.format(seq=3).encode(),)).start()
        started = time.monotonic()
        assert device.poll(30.0) == [(XID13.format(seq=3).rstrip("\n"), False)]
        assert time.monotonic() - started < 15.0  # woken by the line, not by its 30 s timeout
    finally:
        device.close()


def test_kmsg_overwritten_records_are_logged_and_reading_goes_on(
    kmsg_pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    ours, kernel = kmsg_pair
    fd = os.dup(ours.fileno())
    device = KmsgDevice(fd)
    real_read = os.read
    pending_epipe = [True]

    def read(which: int, size: int) -> bytes:
        if which == fd and pending_epipe:
            pending_epipe.clear()
            raise BrokenPipeError(32, "Broken pipe")
        return real_read(which, size)

    monkeypatch.setattr(reader_module.os, "read", read)
    try:
        kernel.send(XID13.format(seq=10).encode())
        with capture_logs() as logs:
            assert device.poll(0.5) == [(XID13.format(seq=10).rstrip("\n"), True)]
        assert not pending_epipe
        assert [(e["event"], e["log_level"]) for e in logs] == [("kmsg_records_overwritten", "warning")]
    finally:
        monkeypatch.undo()
        device.close()


def test_kmsg_over_long_record_is_cut(kmsg_pair: tuple[socket.socket, socket.socket]) -> None:
    ours, kernel = kmsg_pair
    device = KmsgDevice(os.dup(ours.fileno()))
    try:
        kernel.send(b"6,1,2,-;" + b"\xff" * 20_000)
        [(text, historical)] = device.poll(0.5)
        assert historical and len(text.encode("utf-8", "replace")) <= 3 * MAX_LINE_BYTES
        assert set(text[8:]) == {"\ufffd"}
    finally:
        device.close()


def test_kmsg_peer_gone_does_not_spin(kmsg_pair: tuple[socket.socket, socket.socket]) -> None:
    ours, kernel = kmsg_pair
    device = KmsgDevice(os.dup(ours.fileno()))
    kernel.shutdown(socket.SHUT_RDWR)
    try:
        assert device.poll(0.0) == []
        started = time.monotonic()
        assert device.poll(0.1) == []
        assert time.monotonic() - started >= 0.09
    finally:
        device.close()
