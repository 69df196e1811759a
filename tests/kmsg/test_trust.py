"""The parser believes only the kernel: records of other facilities, NVRM text
quoted inside other messages, and numbers too long or out of range are refused."""

from __future__ import annotations

import pytest

from gpuguard.kmsg.parser import KernelLogParser, KmsgRecord, parse_nvrm, parse_record

from .nvrm_lines import BOOT, NOW, nvrm, xid

XID79 = "NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, name=python, GPU has fallen off the bus."

# --- only facility 0 (kernel) is believed ---------------------------------


def test_raw_record_keeps_its_facility() -> None:
    assert parse_record(f"3,7,100,-;{XID79}") == KmsgRecord(message=XID79, seq=7, level=3, usec=100, facility=0)
    assert parse_record(f"14,8,100,-;{XID79}") == KmsgRecord(message=XID79, seq=8, level=6, usec=100, facility=1)
    assert parse_record(f"<11>[    5.5] {XID79}") == KmsgRecord(message=XID79, level=3, usec=5_500_000, facility=1)


@pytest.mark.parametrize(
    "line",
    [
        f"14,5,100,-;{XID79}",  # user.info: what `echo ... > /dev/kmsg` and `logger --kmsg` write
        f"11,5,100,-;{XID79}",  # user.err
        f"27,5,100,-;{XID79}",  # daemon.err
        f"191,5,100,-;{XID79}",  # local7.debug
        f"<12>[  171.5] {XID79}",  # `dmesg -r` prints the facility too
        "14,5,100,-;NVRM: GPU at PCI:0000:3b:00 has fallen off the bus.",
        "14,5,100,-;NVRM: GPU at PCI:0000:3b:00: GPU-509665ad-b600-ac93-3616-d754b23d636d",
        f"May  6 00:38:27 alex myprog[812]: {XID79}",  # a syslog line from a program, not the kernel
    ],
)
def test_records_from_other_facilities_are_not_believed(line: str) -> None:
    assert nvrm(line) is None
    parser = KernelLogParser(boot_time=BOOT)
    record = parse_record(line)
    assert record is not None and parser.feed(record, now=NOW) is None


def test_kernel_records_are_believed_at_every_level() -> None:
    for prio in range(8):
        assert xid(f"{prio},5,100,-;{XID79}").xid == 79


def test_a_user_record_cannot_finish_a_kernel_report() -> None:
    parser = KernelLogParser(boot_time=BOOT)
    lines = [
        "3,10,100,-;NVRM: The NVIDIA GPU 0000:b3:00.0",
        "11,11,101,-;NVRM: (PCI ID: 10de:26b5) installed in this system has",
        "11,12,102,-;NVRM: fallen off the bus and is not responding to commands.",
    ]
    records = [parse_record(line) for line in lines]
    assert [parser.feed(r, now=NOW) for r in records if r] == [None, None, None]


def test_continuation_lines_of_a_user_record_are_not_believed() -> None:
    parser = KernelLogParser(boot_time=BOOT)
    found = [
        parser.feed(r, now=NOW)
        for r in (parse_record("<14>[    1.0] hello"), parse_record(f"               {XID79}"))
        if r is not None
    ]
    assert found == [None, None]


# --- NVRM is read where the driver writes it: at the start of the message --


@pytest.mark.parametrize(
    "line",
    [
        f"foo: user said {XID79}",
        f"6,5,100,-;foo: user said {XID79}",
        f"[  171.5] audit: type=1100 msg='{XID79}'",
        "6,5,100,-;usb 1-1: NVRM: GPU at PCI:0000:3b:00 has fallen off the bus.",
        "6,5,100,-;x NVRM: GPU at PCI:0000:3b:00: GPU-509665ad-b600-ac93-3616-d754b23d636d",
        "6,5,100,-;x NVRM: The NVIDIA GPU 0000:b3:00.0 installed in this system has fallen off the bus",
        f"May  6 00:38:27 alex kernel: [ 4909.922970] foo: {XID79}",
    ],
)
def test_nvrm_text_inside_another_message_is_not_believed(line: str) -> None:
    assert nvrm(line) is None


@pytest.mark.parametrize(
    "line",
    [
        f"May  6 00:38:27 alex kernel: [ 4909.922970] {XID79}",  # /var/log/kern.log, journalctl -k
        f"May  6 00:38:27 alex kernel: {XID79}",
        f"2025-05-06T00:38:27.123456+00:00 alex kernel: {XID79}",  # rsyslog's RFC 3339 time
        f"2025-05-06T00:38:27+0000 alex kernel: {XID79}",  # journalctl -o short-iso
        f"[  171.500000] [  T1234] {XID79}",  # dmesg with the caller id (CONFIG_PRINTK_CALLER)
        f"[Sun Feb 23 16:24:18 2025] [    C3] {XID79}",
    ],
)
def test_framings_that_put_text_before_the_message(line: str) -> None:
    found = xid(line)
    assert (found.xid, found.pci_bus_id, found.pid, found.message) == (
        79, "0000:3b:00", 1234, "GPU has fallen off the bus.",
    )


# --- numbers: too long or out of range refuses the record ------------------


@pytest.mark.parametrize(
    "line",
    [
        "NVRM: Xid (PCI:0000:3b:00): 123456, Graphics Exception",  # was read as Xid 12345
        "NVRM: Xid (PCI:0000:3b:00): 79999, GPU has fallen off the bus.",
        "NVRM: Xid (PCI:0000:3b:00): 0, Graphics Exception",
        "NVRM: Xid (PCI:0000:3b:00): 79x, GPU has fallen off the bus.",
        "NVRM: Xid (PCI:0000:3b:00): \u0667\u0669, GPU has fallen off the bus.",  # Arabic-Indic 79
        "NVRM: Xid (PCI:0000:3b:00): 13, pid=12345678901, name=python, Graphics Exception",  # was pid 1234567890
        "NVRM: Xid (PCI:0000:3b:00): 13, pid=4194305, name=python, Graphics Exception",  # above PID_MAX_LIMIT
        "NVRM: Xid (PCI:0000:3b:00): 13, pid=, name=python, Graphics Exception",
        "NVRM: Xid (PCI:0000:3b:00): 13, pid=\u0661\u0662, name=python, Graphics Exception",
        "NVRM: Xid (PCI:000000000:3b:00): 13, Graphics Exception",
        "NVRM: Xid (PCI:0000:3b:00.9): 13, Graphics Exception",
        "NVRM: GPU at PCI:0000:3b:0012: GPU-509665ad-b600-ac93-3616-d754b23d636d",
        "NVRM: GPU at PCI:0000:3b:00: GPU-509665ad-b600-ac93-3616-d754b23d636d0",
        "NVRM: GPU 0000:3b:001: GPU has fallen off the bus.",
    ],
)
def test_over_long_or_out_of_range_numbers_refuse_the_record(line: str) -> None:
    assert nvrm(line) is None


def test_numbers_at_their_bounds_are_read() -> None:
    top = xid("NVRM: Xid (PCI:0000:3b:00): 9999, pid=4194304, name=python, x")
    assert (top.xid, top.pid) == (9999, 4194304)
    low = xid("NVRM: Xid (PCI:0000:3b:00): 1, pid=0, name=swapper/0, x")
    assert (low.xid, low.pid, low.process_name) == (1, 0, "swapper/0")


def test_a_refused_record_is_refused_by_parse_nvrm_too() -> None:
    record = KmsgRecord(message=XID79, facility=1)
    assert parse_nvrm(record, boot_time=BOOT, now=NOW) is None
