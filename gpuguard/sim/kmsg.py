"""The simulated kernel log: records in raw /dev/kmsg format (`prio,seq,usec,-;text`),
so the daemon's real kernel-log reader and Xid parser handle injected Xids."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from gpuguard.observations import pci_key

PRIO_ERR = 3
PRIO_INFO = 6
_TAIL_BYTES = 64 * 1024


def xid_record(pci_bus_id: str, code: int, pid: int | None, name: str | None, text: str) -> str:
    """The driver's Xid line, the PCI id in the kernel's short `DDDD:BB:DD` form."""
    who = f"pid={pid}, name={name}" if pid is not None else "pid='<unknown>', name=<unknown>"
    return f"NVRM: Xid (PCI:{pci_key(pci_bus_id)}): {code}, {who}, {text}"


def mapping_record(pci_bus_id: str, uuid: str) -> str:
    """The line a driver prints at load for each GPU: how the log's PCI ids map to UUIDs."""
    return f"NVRM: GPU at PCI:{pci_key(pci_bus_id)}: {uuid}"


class KernelLogWriter:
    """Appends records to one file; sequence numbers continue after what it already holds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seq: int | None = None
        self._lock = threading.Lock()

    def write(self, records: list[tuple[int, str]]) -> None:
        """(prio, text) records, in one write so a follower never sees half of them."""
        with self._lock:
            if self._seq is None:
                self._seq = self._last_seq()
            usec = int(time.monotonic() * 1_000_000)  # CLOCK_MONOTONIC: time since boot, as the kernel stamps
            lines = []
            for prio, text in records:
                self._seq += 1
                lines.append(f"{prio},{self._seq},{usec},-;{text}\n")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, "".join(lines).encode())
            finally:
                os.close(fd)

    def _last_seq(self) -> int:
        try:
            with self.path.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - _TAIL_BYTES))
                tail = f.read().decode(errors="replace").splitlines()
        except FileNotFoundError:
            return 0
        for line in reversed(tail):
            fields = line.split(",", 3)
            if len(fields) >= 3 and fields[1].isdigit():
                return int(fields[1])
        return 0
