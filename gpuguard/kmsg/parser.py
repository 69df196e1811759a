"""Kernel-log lines in, Xid observations out. Pure: no I/O, no clock.

One line is first framed (`parse_record`: raw /dev/kmsg, `dmesg`, `dmesg -r`,
`dmesg -T`, a syslog file or `journalctl -k`, or a bare message), then read
for what the NVIDIA driver says (`parse_nvrm`): an Xid, a GPU that fell off
the bus without an Xid number (that is Xid 79), or the PCI-to-UUID line the
driver prints once per GPU. `KernelLogParser` joins the driver's reports that
go on over several records.

Only the kernel is believed. Any root process can write to /dev/kmsg, but the
kernel stamps what user space writes with a facility other than 0 (kernel),
so a record whose framing names another facility is not read (`dmesg` text
and bare lines do not say; they are read). The driver starts each line with
`NVRM: `, so a line is read only from its start: NVRM text quoted inside
another message is not the driver's. Numbers are bounded: a code, pid or PCI
address with too many digits, or out of range, refuses the record rather than
being cut to something that looks valid.

The line forms come from the NVIDIA driver's sources (open-gpu-kernel-modules:
`nvErrorLog`, `NV_DEV_PRINTF`, the probe's and `osHandleGpuLost`'s "fallen off
the bus" texts), NVIDIA's Xid catalog, and real captures (leptonai/gpud test
data). Every pattern is bounded, so no input makes a regex backtrack for long.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace

from gpuguard.observations import XidObservation, pci_key

MAX_RECORD_CHARS = 8192  # longer records are cut here before parsing
XID_FALLEN_OFF_BUS = 79
KERNEL_FACILITY = 0  # syslog facility 0: the kernel's own records
_USER_FACILITY = 1  # syslog's facility for a program's lines
_XID_RANGE = range(1, 10_000)  # the catalog ends near 170: four digits leave room, five are no Xid
_PID_RANGE = range(0, 4_194_305)  # up to pid_max's ceiling (PID_MAX_LIMIT): no larger pid exists
_REPORT_WINDOW = 8  # records a driver report stays open after a line that names its GPU
_MAX_REPORT_LINES = 4  # text kept per report: the longest report we join has 3 lines
_NVRM = "NVRM: "
_XID_PREFIX = "NVRM: Xid ("


@dataclass(frozen=True, slots=True)
class KmsgRecord:
    """One kernel-log record, whatever framing it came in."""

    message: str
    seq: int | None = None
    level: int | None = None  # syslog level, 0 (emerg) .. 7 (debug)
    usec: int | None = None  # microseconds since boot
    wall_time: float | None = None  # seconds since the epoch, when the line says
    # an indented line of `dmesg` output: the rest of the record before it
    continuation: bool = False
    facility: int | None = None  # syslog facility, 0 = kernel; None where the framing does not say


@dataclass(frozen=True, slots=True)
class PciMapping:
    """The driver's `NVRM: GPU at PCI:<bus>: GPU-<uuid>` line: which GPU sits where."""

    pci_bus_id: str  # pci_key() form
    uuid: str


# raw /dev/kmsg: "prio,seq,usec,flags[,more];message", prio = facility * 8 + level
_KMSG = re.compile(
    r"(?P<prio>\d{1,10}),(?P<seq>\d{1,20}),(?P<usec>\d{1,20}),[^;]{0,128};(?P<msg>.*)", re.DOTALL | re.ASCII
)
# /dev/kmsg dictionary lines after a record: " SUBSYSTEM=pci", " DEVICE=+pci:0000:3b:00.0"
_DICT_LINE = re.compile(r"\s+[A-Z][A-Z0-9_]{0,63}=")
# `dmesg -r` prefixes the syslog priority: "<6>[  12.3] ..."
_PRIO_PREFIX = re.compile(r"<(?P<prio>\d{1,10})>", re.ASCII)
# util-linux `dmesg` prints the caller after the time where the kernel records it: "[  T123] "
_CALLER = r"(?:\[ {0,10}[TC]\d{1,10}\] ?)?"
# `dmesg -T`: "[Sun Feb 23 16:24:18 2025] message"
_CTIME = re.compile(
    rf"\[(?P<ts>[A-Za-z]{{3}} [A-Za-z]{{3}} [ \d]?\d \d{{1,2}}:\d{{2}}:\d{{2}} \d{{4}})\] ?{_CALLER}(?P<msg>.*)",
    re.DOTALL | re.ASCII,
)
# `dmesg`: "[  123.456789] message"
_MONO = re.compile(
    rf"\[ {{0,12}}(?P<sec>\d{{1,12}})\.(?P<frac>\d{{1,9}})\] ?{_CALLER}(?P<msg>.*)", re.DOTALL | re.ASCII
)
# a syslog file or `journalctl`: "May  6 00:38:27 host kernel: [ 4909.9] message", or an ISO time first
_SYSLOG = re.compile(
    r"(?:[A-Z][a-z]{2} [ \d]\d \d{2}:\d{2}:\d{2}(?:\.\d{1,9})?"
    r"|\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:Z|[+-]\d{2}:?\d{2}))"
    r" \S{1,255} (?P<tag>[^\s\[:]{1,64})(?:\[\d{1,10}\])?: ?(?P<msg>.*)",
    re.DOTALL | re.ASCII,
)
# /dev/kmsg escapes non-printable bytes (and the backslash) as \xHH
_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")

# the kernel's short PCI form, all of it: a longer run of digits is no PCI address
_PCI_TEXT = r"[0-9a-fA-F]{1,8}:[0-9a-fA-F]{1,2}:[0-9a-fA-F]{1,2}(?:\.[0-7])?(?![0-9a-fA-F.])"
# NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, name=python, GPU has fallen off the bus.
# NVRM: Xid (0000:01:00): 13, Graphics Exception: ...       (older drivers)
# NVRM: Xid (PCI:0018:01:00): 145, RLW_RXPIPE Nonfatal XC0 i0 Link 13 (0x... ...)   (NVLink5, 144-150)
# The whole first line must match: a code or pid with more digits than allowed (re.ASCII: only
# 0-9 are digits) fails it, and a pid field the pattern refused may not pass as the message.
_XID = re.compile(
    rf"NVRM: Xid \((?:PCI:)?(?P<pci>{_PCI_TEXT})\): (?P<xid>\d{{1,4}})"
    r"(?:, pid=(?P<pid>'?<unknown>'?|\d{1,7}))?"
    r"(?:, name=(?P<name>[^,\n]{0,64}))?"
    r"(?:,? (?!pid=)(?P<msg>[^\n]*))?"
    r"(?:\n|\Z)",
    re.ASCII,
)
# NVRM: GPU at PCI:0000:9b:00: GPU-509665ad-b600-ac93-3616-d754b23d636d
_MAPPING = re.compile(
    rf"NVRM: GPU at PCI:(?P<pci>{_PCI_TEXT}): "
    r"(?P<uuid>GPU-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})(?![0-9a-zA-Z-])"
)
# a line that names its GPU; with "fallen off the bus" in its record, that GPU is Xid 79:
#   NVRM: GPU 0000:3b:00.0: GPU has fallen off the bus.          (NV_DEV_PRINTF)
#   NVRM: GPU at 0000:01:00.0 has fallen off the bus.            (older drivers)
#   NVRM: GPU at PCI:0000:3b:00 has fallen off the bus.
#   NVRM: The NVIDIA GPU 0000:b3:00.0\nNVRM: (PCI ID: 10de:26b5) installed in this system has\n
#   NVRM: fallen off the bus and is not responding to commands.  (probe; one record, three lines)
_GPU_NAMED = re.compile(rf"NVRM: (?:The NVIDIA GPU|GPU(?: at)?) (?:PCI:)?(?P<pci>{_PCI_TEXT})")
_FALLEN_TEXT = "fallen off the bus"
# the lines of a report that say it without naming the GPU (probe's third line; older drivers)
_FALLEN_LINE = re.compile(r"^NVRM: (?:GPU has )?fallen off the bus", re.MULTILINE)


def parse_record(line: str) -> KmsgRecord | None:
    """Frame one line of kernel-log text; None for nothing to read (empty or a dictionary line)."""
    line = line[:MAX_RECORD_CHARS].rstrip("\r\n")
    if not line.strip():
        return None
    if line[0].isspace():
        if _DICT_LINE.match(line):
            return None
        return KmsgRecord(message=line.strip(), continuation=True)
    m = _KMSG.match(line)
    if m:
        prio = int(m["prio"])
        return KmsgRecord(
            message=_unescape(m["msg"]), seq=int(m["seq"]), level=prio & 7, usec=int(m["usec"]), facility=prio >> 3
        )
    level = facility = None
    m = _PRIO_PREFIX.match(line)
    if m:
        level, facility = int(m["prio"]) & 7, int(m["prio"]) >> 3
        line = line[m.end() :]
    m = _CTIME.match(line)
    if m:
        return KmsgRecord(message=m["msg"], level=level, wall_time=_ctime(m["ts"]), facility=facility)
    m = _MONO.match(line)
    if m:
        usec = int(m["sec"]) * 1_000_000 + int(m["frac"].ljust(6, "0")[:6])
        return KmsgRecord(message=m["msg"], level=level, usec=usec, facility=facility)
    m = _SYSLOG.match(line)
    if m:
        if m["tag"] != "kernel":
            return KmsgRecord(message=m["msg"], facility=_USER_FACILITY)
        # the kernel's own time counts from some boot, perhaps not this one: only strip it
        inner = _MONO.match(m["msg"])
        return KmsgRecord(message=inner["msg"] if inner else m["msg"], facility=KERNEL_FACILITY)
    return KmsgRecord(message=line, level=level, facility=facility)


def parse_nvrm(record: KmsgRecord, *, boot_time: float, now: float) -> XidObservation | PciMapping | None:
    """What the NVIDIA driver says in this record, if anything we act on and it is the driver's."""
    if not _from_driver(record):
        return None
    text = record.message
    m = _XID.match(text)
    if m:
        return _xid(m, record, boot_time, now)
    m = _MAPPING.match(text)
    if m:
        return PciMapping(pci_bus_id=pci_key(m["pci"]), uuid=m["uuid"])
    m = _GPU_NAMED.match(text)
    if m and _FALLEN_TEXT in text:
        return _fallen(pci_key(m["pci"]), record, text, boot_time, now)
    return None


@dataclass(slots=True)
class _Report:
    """The driver's lines about one GPU since a line last named it."""

    pci: str
    head: KmsgRecord  # the line that named the GPU: it dates the finding
    lines: list[str]
    until: int  # the last record number that may still join it
    fallen: bool  # an Xid 79 already came out of it


class KernelLogParser:
    """Reads records in order, joining the driver's reports that go on over records.

    Some reports name the GPU only in their first line: the probe's "The
    NVIDIA GPU <pci>" / "(PCI ID: ...) installed in this system has" /
    "fallen off the bus and is not responding to commands.", and on older
    drivers a bare "GPU has fallen off the bus." after the lines that named
    the GPU. Newer kernels keep the probe's lines in one record (read whole by
    `parse_nvrm`); older kernels split them into records, `dmesg` prints them
    as indented lines, and unrelated records can come in between. So a report
    is kept per PCI address for `_REPORT_WINDOW` records after a line names
    its GPU, and a driver line that names no GPU joins the GPU named last. A
    report yields Xid 79 once however many of its lines say so; the driver's
    Xid lines always come out.
    """

    def __init__(self, *, boot_time: float) -> None:
        self._boot_time = boot_time
        self._count = 0  # records fed so far
        self._last: KmsgRecord | None = None  # the driver record that indented `dmesg` lines go on
        self._reports: dict[str, _Report] = {}  # by PCI address; the GPU named last is last

    def feed(self, record: KmsgRecord, *, now: float) -> XidObservation | PciMapping | None:
        """The finding this record completes, if any; records must come in log order."""
        self._count += 1
        self._reports = {pci: r for pci, r in self._reports.items() if r.until >= self._count}
        if record.continuation:  # an indented `dmesg` line: the rest of the record before it
            if self._last is None:  # that record is not the driver's, or we did not see it
                return None
            record = replace(self._last, message=record.message)
        else:
            self._last = record if _from_driver(record) else None
            if self._last is None:
                return None
        if not record.message.startswith(_NVRM):
            return None
        found = parse_nvrm(record, boot_time=self._boot_time, now=now)
        if found is not None and found.pci_bus_id is not None:
            return self._named(found.pci_bus_id, record, found)
        named = _GPU_NAMED.match(record.message)
        if named:
            return self._named(pci_key(named["pci"]), record, None)
        return self._unnamed(record, now)

    def _named(
        self, pci: str, record: KmsgRecord, found: XidObservation | PciMapping | None
    ) -> XidObservation | PciMapping | None:
        """A line that names its GPU: the GPU's report goes on from here."""
        old = self._reports.pop(pci, None)
        report = _Report(pci, record, [record.message], self._count + _REPORT_WINDOW, old is not None and old.fallen)
        self._reports[pci] = report
        if isinstance(found, XidObservation) and found.xid == XID_FALLEN_OFF_BUS:
            if report.fallen and not record.message.startswith(_XID_PREFIX):
                return None  # this report said it already
            report.fallen = True
        return found

    def _unnamed(self, record: KmsgRecord, now: float) -> XidObservation | None:
        """A driver line that names no GPU: it goes on the report of the GPU named last."""
        if not self._reports:
            return None
        report = next(reversed(self._reports.values()))
        if len(report.lines) < _MAX_REPORT_LINES:
            report.lines.append(record.message)
        if report.fallen or not _FALLEN_LINE.search(record.message):
            return None
        report.fallen = True
        return _fallen(report.pci, report.head, "\n".join(report.lines), self._boot_time, now)


def _from_driver(record: KmsgRecord) -> bool:
    """The kernel's record (or one whose framing does not say), in the driver's words."""
    return record.facility in (None, KERNEL_FACILITY) and record.message.startswith(_NVRM)


def _xid(m: re.Match[str], record: KmsgRecord, boot_time: float, now: float) -> XidObservation | None:
    """The Xid of a matched Xid line; None for a code or pid out of range."""
    xid = int(m["xid"])
    pid = int(m["pid"]) if m["pid"] and m["pid"].isdigit() else None
    if xid not in _XID_RANGE or (pid is not None and pid not in _PID_RANGE):
        return None
    return XidObservation(
        xid=xid,
        timestamp=_timestamp(record, boot_time, now),
        source="kmsg",
        pci_bus_id=pci_key(m["pci"]),
        pid=pid,
        process_name=_process_name(m["name"]),
        message=(m["msg"] or "").strip(),
    )


def _fallen(pci: str, record: KmsgRecord, text: str, boot_time: float, now: float) -> XidObservation:
    """Xid 79 from a "fallen off the bus" report that carries no Xid number."""
    return XidObservation(
        xid=XID_FALLEN_OFF_BUS,
        timestamp=_timestamp(record, boot_time, now),
        source="kmsg",
        pci_bus_id=pci,
        message=" ".join(part.strip().removeprefix("NVRM:").strip() for part in text.split("\n")),
    )


def _unescape(message: str) -> str:
    r"""Undo /dev/kmsg's \xHH escapes; the bytes they stand for may be UTF-8."""
    if "\\x" not in message:
        return message
    out = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(message):
        out += message[pos : m.start()].encode("utf-8", "replace")
        out.append(int(m[1], 16))
        pos = m.end()
    out += message[pos:].encode("utf-8", "replace")
    return out.decode("utf-8", "replace")


def _ctime(text: str) -> float | None:
    """`dmesg -T` prints local time in ctime form."""
    try:
        return time.mktime(time.strptime(text, "%a %b %d %H:%M:%S %Y"))
    except (ValueError, OverflowError):
        return None


def _timestamp(record: KmsgRecord, boot_time: float, now: float) -> float:
    """Wall time of the record; never later than now (a garbled usec must not date it in the future)."""
    if record.wall_time is not None:
        return min(record.wall_time, now)
    if record.usec is not None:
        return min(boot_time + record.usec / 1e6, now)
    return now


def _process_name(name: str | None) -> str | None:
    if name is None:
        return None
    name = name.strip()
    return None if name in ("", "<unknown>", "'<unknown>'") else name
