"""The kernel-log parser on real captures, on lines written from NVIDIA's Xid
documentation, and on garbage."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuguard.kmsg.parser import (
    MAX_RECORD_CHARS,
    KernelLogParser,
    KmsgRecord,
    PciMapping,
    parse_nvrm,
    parse_record,
)
from gpuguard.observations import XidObservation

from .nvrm_lines import BOOT, NOW, nvrm, xid

CAPTURES = Path(__file__).parents[3] / "shared" / "testdata" / "kernel-log"


def captured(name: str) -> list[str]:
    path = CAPTURES / name
    if not path.exists():
        pytest.skip(f"kernel-log captures not found at {CAPTURES} (the shared folder beside the checkout)")
    return path.read_text(encoding="utf-8").splitlines()


# --- real captures --------------------------------------------------------


def test_dmesg_capture_gives_every_xid_119_and_the_uuid_mapping() -> None:
    lines = captured("dmesg-with-xid-119.log")
    found = [f for f in (nvrm(line) for line in lines) if f is not None]
    xids = [f for f in found if isinstance(f, XidObservation)]
    assert len(xids) == sum("NVRM: Xid" in line for line in lines) == 5
    assert {x.xid for x in xids} == {119}
    assert {x.pci_bus_id for x in xids} == {"0000:9b:00"}
    assert [x.pid for x in xids] == [2024380, 2024380, 2024380, 1263500, 1240590]
    assert [x.process_name for x in xids] == ["nvidia-smi"] * 3 + ["cache_mgr_main", "gpud"]
    assert xids[0].message.startswith("Timeout after 6s of waiting for RPC response from GPU4 GSP!")
    assert xids[0].timestamp == time.mktime(time.strptime("Sun Feb 23 16:24:18 2025", "%a %b %d %H:%M:%S %Y"))
    mappings = [f for f in found if isinstance(f, PciMapping)]
    assert mappings == [PciMapping(pci_bus_id="0000:9b:00", uuid="GPU-509665ad-b600-ac93-3616-d754b23d636d")]


def test_raw_kmsg_capture_frames_every_record_and_holds_no_xid() -> None:
    lines = captured("kmsg-nvswitch.log")
    records = [parse_record(line) for line in lines]
    assert all(r is not None for r in records)
    assert [r.seq for r in records if r] == list(range(3964, 3964 + len(lines)))
    first = records[0]
    assert first == KmsgRecord(
        message="nvidia-nvswitch2: open (major=510)", seq=3964, level=6, usec=206764307, facility=0
    )
    assert all(parse_nvrm(r, boot_time=BOOT, now=NOW) is None for r in records if r)


# --- framing --------------------------------------------------------------


def test_raw_kmsg_record_with_level_facility_and_extra_fields() -> None:
    record = parse_record("27,812,4567890,-,caller=T123;NVRM: hello; world\n")
    assert record == KmsgRecord(message="NVRM: hello; world", seq=812, level=3, usec=4567890, facility=3)


def test_kmsg_dictionary_lines_are_ignored() -> None:
    assert parse_record(" SUBSYSTEM=pci") is None
    assert parse_record(" DEVICE=+pci:0000:3b:00.0") is None


def test_kmsg_escapes_are_undone() -> None:
    record = parse_record(r"4,1,2,-;caf\xc3\xa9 a\x5cb line\x0anext")
    assert record is not None and record.message == "café a\\b line\nnext"


def test_plain_dmesg_time_since_boot() -> None:
    assert parse_record("[  123.456789] NVRM: x") == KmsgRecord(message="NVRM: x", usec=123_456_789)
    assert parse_record("<4>[    5.5] y") == KmsgRecord(message="y", level=4, usec=5_500_000, facility=0)


def test_dmesg_t_wall_time_with_a_space_padded_day() -> None:
    record = parse_record("[Mon Feb  3 01:02:03 2025] msg")
    assert record is not None and record.message == "msg"
    assert record.wall_time == time.mktime(time.strptime("Mon Feb 3 01:02:03 2025", "%a %b %d %H:%M:%S %Y"))


def test_dmesg_indented_line_is_a_continuation() -> None:
    record = parse_record("               NVRM: fallen off the bus and is not responding to commands.")
    text = "NVRM: fallen off the bus and is not responding to commands."
    assert record == KmsgRecord(message=text, continuation=True)


def test_bare_and_syslog_lines_are_bare_messages() -> None:
    assert parse_record("hello") == KmsgRecord(message="hello")
    found = xid("May  6 00:38:27 alex kernel: [ 4909.922970] NVRM: Xid (0000:01:00): 13, 0005 00000000 0000502d")
    assert (found.xid, found.pci_bus_id, found.timestamp) == (13, "0000:01:00", NOW)


def test_timestamps_wall_then_boot_plus_usec_then_now() -> None:
    line = "NVRM: Xid (PCI:0000:3b:00): 13, Graphics Exception"
    assert xid(f"6,1,2500000,-;{line}").timestamp == BOOT + 2.5
    assert xid(f"[Sun Feb 23 16:24:18 2025] {line}").timestamp < NOW
    assert xid(line).timestamp == NOW
    # a garbled uptime never dates a record after now
    assert xid(f"6,1,99999999999999999,-;{line}").timestamp == NOW


# --- Xid lines from NVIDIA's Xid documentation ----------------------------

DOC_LINES = {
    13: "NVRM: Xid (PCI:0000:3b:00): 13, pid=1234, name=python, Graphics SM Warp Exception on (GPC 0, TPC 1, SM 0): "
    "Out Of Range Address",
    31: "NVRM: Xid (PCI:0000:3b:00): 31, pid=1234, name=python, Ch 00000008, intr 00000000. MMU Fault: ENGINE GRAPHICS "
    "GPCCLIENT_T1_0 faulted @ 0x7f2a_4e000000. Fault is of type FAULT_PDE ACCESS_TYPE_VIRT_READ",
    48: "NVRM: Xid (PCI:0000:3b:00): 48, pid='<unknown>', name=<unknown>, An uncorrectable double bit error (DBE) has "
    "been detected on GPU in the framebuffer at partition 6, subpartition 0.",
    63: "NVRM: Xid (PCI:0000:3b:00): 63, pid='<unknown>', name=<unknown>, Row Remapper: New row (0x0000000000a1b2c3) "
    "is marked for remapping, reset gpu to activate.",
    79: "NVRM: Xid (PCI:0000:3b:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.",
    94: "NVRM: Xid (PCI:0000:3b:00): 94, pid=2345, name=python3, Contained: SM (0x1). RST: No, D-RST: No",
    95: "NVRM: Xid (PCI:0000:3b:00): 95, pid='<unknown>', name=<unknown>, Uncontained: FBHUB. RST: Yes, D-RST: No",
    119: "NVRM: Xid (PCI:0000:3b:00): 119, pid=1240590, name=gpud, Timeout after 6s of waiting for RPC response from "
    "GPU0 GSP! Expected function 76 (GSP_RM_CONTROL) (0x20800a4c 0x4).",
    120: "NVRM: Xid (PCI:0000:3b:00): 120, pid='<unknown>', name=<unknown>, GSP task exception: Reason: Crash.",
    140: "NVRM: Xid (PCI:0000:3b:00): 140, pid='<unknown>', name=<unknown>, An uncorrectable ECC error detected "
    "(possible firmware handling failure) DRAM:-1840691462, LTC:0, MMU:0, RM:0",
    154: "NVRM: Xid (PCI:0000:3b:00): 154, GPU recovery action changed from 0x0 (None) to 0x1 (GPU Reset Required)",
}


@pytest.mark.parametrize("code", sorted(DOC_LINES))
def test_documented_xid_lines(code: int) -> None:
    line = DOC_LINES[code]
    found = xid(f"[  171.5] {line}")
    assert found.xid == code
    assert found.pci_bus_id == "0000:3b:00"
    assert found.timestamp == BOOT + 171.5
    assert found.message and "pid=" not in found.message and "name=" not in found.message
    assert line.endswith(found.message)


def test_pid_and_name_known_and_unknown() -> None:
    known = xid(DOC_LINES[13])
    assert (known.pid, known.process_name) == (1234, "python")
    unknown = xid(DOC_LINES[79])
    assert (unknown.pid, unknown.process_name, unknown.message) == (None, None, "GPU has fallen off the bus.")


def test_old_format_without_pid_and_name() -> None:
    found = xid("NVRM: Xid (PCI:0000:3b:00): 13, Graphics Exception: ESR 0x405840=0x3000000 0x405844=0x0")
    assert (found.xid, found.pid, found.process_name) == (13, None, None)
    assert found.message == "Graphics Exception: ESR 0x405840=0x3000000 0x405844=0x0"
    channel = xid("NVRM: Xid (PCI:0000:3b:00.0): 43, Ch 00000008")
    assert (channel.xid, channel.pci_bus_id, channel.message) == (43, "0000:3b:00", "Ch 00000008")
    no_prefix = xid("NVRM: Xid (0000:af:00): 48, pid='<unknown>', name=<unknown>, Ch 00000008")
    assert (no_prefix.xid, no_prefix.pci_bus_id, no_prefix.message) == (48, "0000:af:00", "Ch 00000008")
    pid_only = xid("NVRM: Xid (PCI:0000:01:00): 79, pid=1, GPU has fallen off the bus.")
    assert (pid_only.pid, pid_only.process_name, pid_only.message) == (1, None, "GPU has fallen off the bus.")


# NVLink5 Xids 144-150 (driver R570+): "<unit> <Fatal|Nonfatal> XC<n> i<n> Link <n> (<intrinfo> <errorstatus> ...)"
NVLINK5 = [
    (144, "NVRM: Xid (PCI:0000:04:00): 144, SAW_MVB Fatal XC0 i0 Link 00 (0x00000001 0x00000002 0x0 0x0)"),
    (
        145,
        "NVRM: Xid (PCI:0018:01:00): 145, pid=876767, name=ray::WorkerDict, RLW_RXPIPE Nonfatal XC0 i0 Link 13 "
        "(0x0409a0c2 0x00000008 0x00000001 0x00000000 0x00100000 0x00000004)",
    ),
    (146, "NVRM: Xid (PCI:0000:04:00): 146, TLW_RX/TLW_RX_PIPE0 Fatal XC0 i0 Link 00 (0x0000000a 0x00000004 0x0 0x0)"),
    (147, "NVRM: Xid (PCI:0000:04:00): 147, TREX Nonfatal XC0 i0 Link 00 (0x0000000e 0x00000001 0x0 0x0)"),
    (148, "NVRM: Xid (PCI:0000:04:00): 148, NVLPW_CTRL/NVLPW Nonfatal XC0 i0 Link 00 (0x0000000f 0x80000000 0x0 0x0)"),
    (
        149,
        "NVRM: Xid (PCI:0019:01:00): 149, NETIR Fatal XC0 i0 Link -1 "
        "(0x000fe406 0x00000000 0x00000000 0x00000000 0x00000000 0x00000000)",
    ),
    (150, "NVRM: Xid (PCI:0000:04:00): 150, MSE_WATCHDOG Fatal XC0 i0 Link 00 (0x00000000 0x00000000 0x0 0x0)"),
]


@pytest.mark.parametrize(("code", "line"), NVLINK5)
def test_nvlink5_extended_xids(code: int, line: str) -> None:
    found = xid(line)
    assert found.xid == code
    pci = line.split("(PCI:", 1)[1].split(")", 1)[0]
    assert found.pci_bus_id == pci
    assert " Link " in found.message and found.message.endswith(")")


def test_nvlink5_pid_and_name() -> None:
    found = xid(NVLINK5[1][1])
    assert (found.pid, found.process_name) == (876767, "ray::WorkerDict")
    assert found.message.startswith("RLW_RXPIPE Nonfatal XC0 i0 Link 13 (")


# --- fallen off the bus without an Xid number -----------------------------


@pytest.mark.parametrize(
    ("line", "pci"),
    [
        ("NVRM: GPU at PCI:0000:3b:00 has fallen off the bus.", "0000:3b:00"),
        ("NVRM: GPU at 0000:01:00.0 has fallen off the bus.", "0000:01:00"),
        ("NVRM: GPU 0000:3b:00.0: GPU has fallen off the bus.", "0000:3b:00"),
        (
            "NVRM: The NVIDIA GPU 0000:05:00.0 installed in this system has fallen off the bus and is not "
            "responding to commands.",
            "0000:05:00",
        ),
        # one /dev/kmsg record, its newlines escaped
        (
            r"3,900,1843308145,-;NVRM: The NVIDIA GPU 0000:b3:00.0\x0aNVRM: (PCI ID: 10de:26b5) installed in this "
            r"system has\x0aNVRM: fallen off the bus and is not responding to commands.\x0a",
            "0000:b3:00",
        ),
    ],
)
def test_fallen_off_the_bus_without_a_number_is_xid_79(line: str, pci: str) -> None:
    found = xid(line)
    assert (found.xid, found.pci_bus_id, found.pid) == (79, pci, None)
    assert "fallen off the bus" in found.message and "NVRM" not in found.message


def test_lines_around_a_gpu_that_are_not_findings() -> None:
    assert nvrm("NVRM: Rate limiting GSP RPC error prints for GPU at PCI:0000:9b:00 (printing 1 of every 30).") is None
    assert nvrm("NVRM: GPU Board Serial Number: 1650124014249") is None
    assert nvrm("NVRM: fallen off the bus and is not responding to commands.") is None  # names no GPU
    assert nvrm("usb 1-1: GPU has fallen off the bus") is None  # not the NVIDIA driver
    assert nvrm("NVRM: loading NVIDIA UNIX Open Kernel Module for x86_64  570.158.01") is None


# --- garbage never raises -------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        "",
        "\n",
        "   ",
        "6,12,34",
        "6,,,;",
        ";;;",
        "[",
        "[ 12.x] NVRM: Xid",
        "[Xxx Yyy 99 99:99:99 2025] NVRM: Xid (PCI:0000:3b:00): 79, x",
        "NVRM: Xid (PCI:0000:3b",
        "NVRM: Xid (PCI:zz:zz:zz): 79, GPU has fallen off the bus.",
        "NVRM: Xid (PCI:0000:3b:00): 99999999999999, x",
        "NVRM: Xid (PCI:0000:3b:00): 79, pid=",
        "NVRM: GPU at PCI:0000:9b:00: GPU-509665ad",
        "\x00\x01\x02NVRM\xff\ufffd",
        r"6,1,2,-;\x\xZZ\x0",
        "NVRM: Xid (" + "0" * 10_000 + "): 79",
        "NVRM: " + "fallen off the bus " * 6000,
        "x" * 100_000 + "NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus.",
    ],
)
def test_garbage_and_partial_records_never_raise(line: str) -> None:
    record = parse_record(line)
    if record is not None:
        assert len(record.message) <= MAX_RECORD_CHARS
        parse_nvrm(record, boot_time=BOOT, now=NOW)


def test_over_long_record_is_cut_before_parsing() -> None:
    record = parse_record("6,1,2,-;NVRM: Xid (PCI:0000:3b:00): 79, " + "y" * 100_000)
    assert record is not None and len(record.message) < MAX_RECORD_CHARS
    found = parse_nvrm(record, boot_time=BOOT, now=NOW)
    assert isinstance(found, XidObservation) and found.xid == 79


def test_pathological_input_is_fast() -> None:
    nasty = [
        "NVRM: Xid (" + ":" * 8000,
        "NVRM: Xid (PCI:0000:3b:00): 79, name=" + "a" * 8000,
        "NVRM: GPU " * 800,
        "NVRM: The NVIDIA GPU 0000:" * 300 + "fallen off the bus",
    ]
    started = time.monotonic()
    for line in nasty * 20:
        record = parse_record(line)
        assert record is not None
        parse_nvrm(record, boot_time=BOOT, now=NOW)
    assert time.monotonic() - started < 1.0


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300).map(lambda b: b.decode("utf-8", "replace"))))
def test_any_text_never_raises(line: str) -> None:
    parser = KernelLogParser(boot_time=BOOT)
    for candidate in (line, "6,1,2,-;NVRM: " + line, "[ 1.0] NVRM: Xid (PCI:0000:3b:00): " + line):
        record = parse_record(candidate)
        if record is not None:
            parser.feed(record, now=NOW)
