"""Fuzzing the kernel-log parser and reader: whatever the log holds, parsing
never raises, and a genuine Xid line always yields its Xid and PCI id."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuguard.kmsg.parser import KernelLogParser, KmsgRecord, PciMapping, parse_nvrm, parse_record
from gpuguard.kmsg.reader import KernelLogSource
from gpuguard.observations import XidObservation

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NOW = 1_700_000_000.0

# text biased towards what the parsers look for, so examples reach past the first regex
_PIECES = st.sampled_from(
    ["NVRM: ", "Xid ", "(PCI:", "0000:3b:00", "): ", "79", ", pid=", "'<unknown>'", ", name=", "python",
     "fallen off the bus", "GPU at PCI:", "The NVIDIA GPU ", "GPU-", "\\x0a", "\\x", "6,123,456,-;", "<3>",
     "[  12.345678] ", "[Sun Feb 23 16:24:18 2025] ", " ", ",", ":", "\n", "\t", "\r"]
)
KMSG_TEXT = st.one_of(st.text(max_size=300), st.lists(st.one_of(_PIECES, st.text(max_size=8)), max_size=30).map("".join))

_SAFE = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_./-", min_size=1, max_size=32)


@st.composite
def xid_lines(draw: st.DrawFn) -> tuple[str, int, str, int | None]:
    """A driver Xid line in one of the framings the parser accepts: (line, xid, pci_key, pid)."""
    domain, bus, dev = draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFF)), draw(st.integers(0, 0x1F))
    xid = draw(st.integers(1, 9999))
    pid = draw(st.one_of(st.none(), st.integers(0, 4_194_304)))
    pci_text = f"{domain:04x}:{bus:02x}:{dev:02x}"
    if draw(st.booleans()):
        pci_text = pci_text.upper()
    who = f"pid={pid}, name={draw(_SAFE)}" if pid is not None else "pid='<unknown>', name=<unknown>"
    text = draw(st.text(alphabet=st.characters(blacklist_categories=["Cc", "Cs"]), max_size=80))
    prefix = "PCI:" if draw(st.booleans()) else ""
    message = f"NVRM: Xid ({prefix}{pci_text}): {xid}, {who}, {text}"
    framing = draw(st.sampled_from(["raw", "dmesg", "ctime", "prio", "bare"]))
    line = {
        "raw": f"{draw(st.integers(0, 7))},{draw(st.integers(0, 10**9))},{draw(st.integers(0, 10**12))},-;{message}",
        "dmesg": f"[{draw(st.integers(0, 10**6)):>5}.{draw(st.integers(0, 999_999)):06d}] {message}",
        "ctime": f"[Sun Feb 23 16:24:18 2025] {message}",
        "prio": f"<{draw(st.integers(0, 7))}>[  1.000000] {message}",
        "bare": message,
    }[framing]
    return line, xid, f"{domain:04x}:{bus:02x}:{dev:02x}", pid


@FUZZ
@given(KMSG_TEXT)
def test_parse_record_and_nvrm_never_raise(line: str) -> None:
    record = parse_record(line)
    assert record is None or isinstance(record, KmsgRecord)
    if record is not None:
        found = parse_nvrm(record, boot_time=NOW - 1000, now=NOW)
        assert found is None or isinstance(found, XidObservation | PciMapping)
        if isinstance(found, XidObservation):
            assert found.timestamp <= NOW


@FUZZ
@given(st.lists(KMSG_TEXT, max_size=12))
def test_the_multi_line_parser_never_raises(lines: list[str]) -> None:
    parser = KernelLogParser(boot_time=NOW - 1000)
    for line in lines:
        record = parse_record(line)
        if record is not None:
            found = parser.feed(record, now=NOW)
            assert found is None or isinstance(found, XidObservation | PciMapping)


@FUZZ
@given(xid_lines())
def test_a_genuine_xid_line_always_parses_right(case: tuple[str, int, str, int | None]) -> None:
    line, xid, pci, pid = case
    record = parse_record(line)
    assert record is not None
    found = parse_nvrm(record, boot_time=NOW - 1000, now=NOW)
    assert isinstance(found, XidObservation), line
    assert (found.xid, found.pci_bus_id, found.pid) == (xid, pci, pid)


@FUZZ
@given(xid_lines(), st.integers(1, 2**29 - 1))  # prio is a 32-bit number
def test_a_genuine_xid_line_from_another_facility_is_never_believed(
    case: tuple[str, int, str, int | None], facility: int
) -> None:
    """What user space writes to /dev/kmsg carries a facility other than the kernel's (0)."""
    message = case[0][case[0].index("NVRM: Xid") :]
    for line in (f"{facility * 8 + 3},1,2,-;{message}", f"<{facility * 8 + 3}>[  1.000000] {message}"):
        record = parse_record(line)
        assert record is not None and record.facility == facility
        assert parse_nvrm(record, boot_time=NOW - 1000, now=NOW) is None
        assert KernelLogParser(boot_time=NOW - 1000).feed(record, now=NOW) is None


@FUZZ
@given(xid_lines(), st.text(min_size=1, max_size=40))
def test_a_genuine_xid_line_inside_another_message_is_never_believed(
    case: tuple[str, int, str, int | None], before: str
) -> None:
    message = case[0][case[0].index("NVRM: Xid") :]
    record = parse_record(f"6,1,2,-;{before}{message}")
    assert record is not None
    found = parse_nvrm(record, boot_time=NOW - 1000, now=NOW)
    assert found is None or record.message.startswith("NVRM: ")


@FUZZ
@given(*[st.text(alphabet="0123456789", min_size=1, max_size=12)] * 2)
def test_numbers_are_read_whole_or_not_at_all(code: str, pid: str) -> None:
    """Never cut to something that looks valid: the Xid and pid read are the ones written, in range."""
    line = f"3,1,2,-;NVRM: Xid (PCI:0000:3b:00): {code}, pid={pid}, name=python, Graphics Exception"
    record = parse_record(line)
    assert record is not None
    found = parse_nvrm(record, boot_time=NOW - 1000, now=NOW)
    valid = 1 <= int(code) <= 9999 and len(code) <= 4 and int(pid) <= 4_194_304 and len(pid) <= 7
    if valid:
        assert isinstance(found, XidObservation) and (found.xid, found.pid) == (int(code), int(pid))
    else:
        assert found is None


@FUZZ
@given(st.lists(st.binary(max_size=400), max_size=8), xid_lines())
def test_the_reader_survives_any_bytes_and_still_finds_the_xid(garbage: list[bytes], case: tuple[str, int, str, int | None]) -> None:
    """Arbitrary bytes (bad UTF-8, NULs, over-long lines) in the log file, then one genuine Xid line."""
    line, xid, pci, _ = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kmsg"
        path.write_bytes(b"".join(g + b"\n" for g in garbage))
        source = KernelLogSource(path, boot_time=NOW - 1000)
        try:
            found = source.read(0)
            with path.open("ab") as f:
                f.write(line.encode() + b"\n")
            found += source.read(0)
        finally:
            source.close()
    assert all(isinstance(item, XidObservation | PciMapping) for item in found)
    assert any(isinstance(i, XidObservation) and (i.xid, i.pci_bus_id) == (xid, pci) for i in found), found


def test_an_over_long_line_is_cut_and_the_next_line_still_parses() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kmsg"
        path.write_bytes(os.urandom(100_000).replace(b"\n", b"x") + b"\nNVRM: Xid (PCI:0000:3b:00): 48, pid=1, name=a, DBE\n")
        source = KernelLogSource(path, boot_time=NOW)
        try:
            found = source.read(0)
        finally:
            source.close()
    assert [(f.xid, f.pci_bus_id) for f in found if isinstance(f, XidObservation)] == [(48, "0000:3b:00")]
