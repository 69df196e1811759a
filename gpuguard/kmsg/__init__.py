"""The kernel-log source: NVIDIA driver lines (Xid, fallen off the bus, PCI-to-UUID) from /dev/kmsg or a file."""

from gpuguard.kmsg.parser import KernelLogParser, KmsgRecord, PciMapping, parse_nvrm, parse_record
from gpuguard.kmsg.reader import KernelLogSource

__all__ = ["KernelLogParser", "KernelLogSource", "KmsgRecord", "PciMapping", "parse_nvrm", "parse_record"]
