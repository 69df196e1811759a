"""Parsing one kernel-log line the way the kmsg tests do: at a fixed boot time and now.
Shared by test_parser, test_trust and test_reports (`from .nvrm_lines import ...`)."""

from __future__ import annotations

from gpuguard.kmsg.parser import PciMapping, parse_nvrm, parse_record
from gpuguard.observations import XidObservation

BOOT = 1_700_000_000.0
NOW = 1_800_000_000.0


def nvrm(line: str) -> XidObservation | PciMapping | None:
    record = parse_record(line)
    assert record is not None
    return parse_nvrm(record, boot_time=BOOT, now=NOW)


def xid(line: str) -> XidObservation:
    found = nvrm(line)
    assert isinstance(found, XidObservation), line
    assert found.source == "kmsg"
    return found
