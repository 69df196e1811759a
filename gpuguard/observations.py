"""Facts from the sources (kernel log, NVML events, job progress) that the
health rules read. Plain frozen data, no I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

_PCI = re.compile(
    r"^(?:(?P<domain>[0-9a-fA-F]{1,8}):)?(?P<bus>[0-9a-fA-F]{1,2}):(?P<dev>[0-9a-fA-F]{1,2})(?:\.(?P<fn>[0-7]))?$"
)


def pci_key(bus_id: str) -> str:
    """One spelling for a PCI address, so the kernel log and NVML agree.

    The kernel log says `0000:3b:00`, NVML says `00000000:3B:00.0`; both
    become `0000:3b:00` (4-digit domain, bus, device, lower case). Raises
    ValueError for anything that is not a PCI address.
    """
    m = _PCI.match(bus_id.strip())
    if not m:
        raise ValueError(f"not a PCI bus id: {bus_id!r}")
    domain = int(m["domain"] or "0", 16)
    return f"{domain:04x}:{int(m['bus'], 16):02x}:{int(m['dev'], 16):02x}"


@dataclass(frozen=True, slots=True)
class XidObservation:
    """One Xid, from the kernel log or from an NVML event."""

    xid: int
    timestamp: float  # wall-clock seconds (time.time())
    source: Literal["kmsg", "nvml"]
    pci_bus_id: str | None = None  # pci_key() form
    uuid: str | None = None  # filled in once the PCI id is mapped
    pid: int | None = None
    process_name: str | None = None
    message: str = ""
    # read at start-up from earlier in this boot: acts only if the GPU still
    # shows the fault
    historical: bool = False
