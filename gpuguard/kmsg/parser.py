"""Kernel-log lines in, Xid observations out. Pure: no I/O, no clock.

One line is first framed (`parse_record`: raw /dev/kmsg, `dmesg`,
`dmesg -T`, or a bare message), then read for what the NVIDIA driver says
(`parse_nvrm`): an Xid, a GPU that fell off the bus without an Xid number
(that is Xid 79), or the PCI-to-UUID line the driver prints once per GPU.
`KernelLogParser` joins the messages the kernel prints over several lines
before reading them.

The line forms come from the NVIDIA driver's sources (open-gpu-kernel-modules:
`nvErrorLog`, `NV_DEV_PRINTF`, the probe's "fallen off the bus" text),
NVIDIA's Xid catalog, and real captures (leptonai/gpud test data).
Every pattern is bounded, so no input makes a regex backtrack for long.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace

from gpuguard.observations import XidObservation, pci_key

MAX_RECORD_CHARS = 8192  # longer records are cut here before parsing
XID_FALLEN_OFF_BUS = 79
_MAX_JOINED_LINES = 4  # the longest multi-line driver message has 3


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


@dataclass(frozen=True, slots=True)
class PciMapping:
    """The driver's `NVRM: GPU at PCI:<bus>: GPU-<uuid>` line: which GPU sits where."""

    pci_bus_id: str  # pci_key() form
    uuid: str


# raw /dev/kmsg: "prio,seq,usec,flags[,more];message"
_KMSG = re.compile(r"(?P<prio>\d{1,10}),(?P<seq>\d{1,20}),(?P<usec>\d{1,20}),[^;]{0,128};(?P<msg>.*)", re.DOTALL)
# /dev/kmsg dictionary lines after a record: " SUBSYSTEM=pci", " DEVICE=+pci:0000:3b:00.0"
_DICT_LINE = re.compile(r"\s+[A-Z][A-Z0-9_]{0,63}=")
# `dmesg -r` prefixes the syslog priority: "<6>[  12.3] ..."
_PRIO_PREFIX = re.compile(r"<(?P<prio>\d{1,10})>")
# `dmesg -T`: "[Sun Feb 23 16:24:18 2025] message"
_CTIME = re.compile(r"\[(?P<ts>[A-Za-z]{3} [A-Za-z]{3} [ \d]?\d \d{1,2}:\d{2}:\d{2} \d{4})\] ?(?P<msg>.*)", re.DOTALL)
# `dmesg`: "[  123.456789] message"
_MONO = re.compile(r"\[ {0,12}(?P<sec>\d{1,12})\.(?P<frac>\d{1,9})\] ?(?P<msg>.*)", re.DOTALL)
# /dev/kmsg escapes non-printable bytes (and the backslash) as \xHH
_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")

_PCI_TEXT = r"[0-9a-fA-F]{1,8}:[0-9a-fA-F]{1,2}:[0-9a-fA-F]{1,2}(?:\.[0-7])?"
# NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, name=python, GPU has fallen off the bus.
# NVRM: Xid (0000:01:00): 13, Graphics Exception: ...       (older drivers)
# NVRM: Xid (PCI:0018:01:00): 145, RLW_RXPIPE Nonfatal XC0 i0 Link 13 (0x... ...)   (NVLink5, 144-150)
_XID = re.compile(
    r"NVRM: Xid \((?:PCI:)?(?P<pci>[0-9a-fA-F:.]{1,24})\): (?P<xid>\d{1,5})"
    r"(?:, pid=(?P<pid>'?<unknown>'?|\d{1,10}))?"
    r"(?:, name=(?P<name>[^,\n]{0,64}))?"
    r"(?:,? (?P<msg>[^\n]*))?"
)
# NVRM: GPU at PCI:0000:9b:00: GPU-509665ad-b600-ac93-3616-d754b23d636d
_MAPPING = re.compile(
    rf"NVRM: GPU at PCI:(?P<pci>{_PCI_TEXT}): "
    r"(?P<uuid>GPU-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})"
)
# the GPU named in a "fallen off the bus" message that has no Xid number:
#   NVRM: GPU 0000:3b:00.0: GPU has fallen off the bus.          (NV_DEV_PRINTF)
#   NVRM: GPU at 0000:01:00.0 has fallen off the bus.            (older drivers)
#   NVRM: GPU at PCI:0000:3b:00 has fallen off the bus.
#   NVRM: The NVIDIA GPU 0000:b3:00.0\nNVRM: (PCI ID: 10de:26b5) installed in this system has\n
#   NVRM: fallen off the bus and is not responding to commands.  (probe; one record, three lines)
_FALLEN_GPU = re.compile(rf"NVRM: (?:The NVIDIA GPU|GPU(?: at)?) (?:PCI:)?(?P<pci>{_PCI_TEXT})")
_FALLEN_TEXT = "fallen off the bus"
_HEADER = "NVRM: The NVIDIA GPU "  # first line of the three-line probe message


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
        return KmsgRecord(
            message=_unescape(m["msg"]),
            seq=int(m["seq"]),
            level=int(m["prio"]) & 7,
            usec=int(m["usec"]),
        )
    level = None
    m = _PRIO_PREFIX.match(line)
    if m:
        level = int(m["prio"]) & 7
        line = line[m.end() :]
    m = _CTIME.match(line)
    if m:
        return KmsgRecord(message=m["msg"], level=level, wall_time=_ctime(m["ts"]))
    m = _MONO.match(line)
    if m:
        usec = int(m["sec"]) * 1_000_000 + int(m["frac"].ljust(6, "0")[:6])
        return KmsgRecord(message=m["msg"], level=level, usec=usec)
    return KmsgRecord(message=line, level=level)


def parse_nvrm(record: KmsgRecord, *, boot_time: float, now: float) -> XidObservation | PciMapping | None:
    """What the NVIDIA driver says in this record, if anything we act on."""
    text = record.message
    if "NVRM" not in text:
        return None
    m = _XID.search(text)
    if m:
        xid = int(m["xid"])
        return XidObservation(
            xid=xid,
            timestamp=_timestamp(record, boot_time, now),
            source="kmsg",
            pci_bus_id=_pci(m["pci"]),
            pid=int(m["pid"]) if m["pid"] and m["pid"].isdigit() else None,
            process_name=_process_name(m["name"]),
            message=(m["msg"] or "").strip(),
        )
    m = _MAPPING.search(text)
    if m:
        pci = _pci(m["pci"])
        return PciMapping(pci_bus_id=pci, uuid=m["uuid"]) if pci else None
    if _FALLEN_TEXT in text:
        m = _FALLEN_GPU.search(text)
        pci = _pci(m["pci"]) if m else None
        if pci is None:
            return None  # no GPU named: nothing to attach it to
        return XidObservation(
            xid=XID_FALLEN_OFF_BUS,
            timestamp=_timestamp(record, boot_time, now),
            source="kmsg",
            pci_bus_id=pci,
            message=" ".join(part.strip().removeprefix("NVRM:").strip() for part in text.splitlines()),
        )
    return None


class KernelLogParser:
    """Reads records in order, joining the driver messages that span lines.

    The probe's "fallen off the bus" message is three lines. Newer kernels keep
    it one record (raw /dev/kmsg escapes the newlines; `dmesg` indents the
    lines after the first); older kernels make each line its own record. A
    group is read again as each line joins it, and yields at most once.
    """

    def __init__(self, *, boot_time: float) -> None:
        self._boot_time = boot_time
        self._group: KmsgRecord | None = None
        self._lines = 0
        self._hit = False

    def feed(self, record: KmsgRecord, *, now: float) -> XidObservation | PciMapping | None:
        group = self._group
        if group is not None and self._lines < _MAX_JOINED_LINES and self._joins(group, record):
            self._group = replace(group, message=group.message + "\n" + record.message)
            self._lines += 1
            if self._hit:
                return None
        else:
            self._group, self._lines, self._hit = record, 1, False
        found = parse_nvrm(self._group, boot_time=self._boot_time, now=now)
        self._hit = found is not None
        return found

    def _joins(self, group: KmsgRecord, record: KmsgRecord) -> bool:
        if record.continuation:
            return True
        # older kernels: the probe message's lines come as separate NVRM records
        return not self._hit and group.message.startswith(_HEADER) and record.message.startswith("NVRM: ")


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


def _pci(text: str) -> str | None:
    try:
        return pci_key(text)
    except ValueError:
        return None


def _process_name(name: str | None) -> str | None:
    if name is None:
        return None
    name = name.strip()
    return None if name in ("", "<unknown>", "'<unknown>'") else name
