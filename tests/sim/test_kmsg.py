from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import psutil

from gpuguard.observations import pci_key
from gpuguard.sim.backend import SimulatedBackend

RECORD = re.compile(r"^(\d+),(\d+),(\d+),-;(.*)$")
XID = re.compile(r"NVRM: Xid \(PCI:([0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2})\): (\d+), pid=")
MAPPING = re.compile(r"NVRM: GPU at PCI:([0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}): (GPU-[0-9a-f-]{36})$")


def records(path: Path) -> list[tuple[int, int, int, str]]:
    out = []
    for line in path.read_text().splitlines():
        m = RECORD.match(line)
        assert m, line
        out.append((int(m[1]), int(m[2]), int(m[3]), m[4]))
    return out


def test_xid_79_line_names_the_gpu_by_its_pci_id(backend: SimulatedBackend, kmsg: Path) -> None:
    backend.inject(1, "xid", "79")
    prio, _, usec, text = records(kmsg)[-1]
    m = XID.search(text)
    assert m, text
    by_pci = {pci_key(g.pci_bus_id): g for g in backend.inventory()}
    assert by_pci[m[1]].index == 1
    assert int(m[2]) == 79
    assert prio == 3
    assert 0 < usec
    assert text.endswith("pid='<unknown>', name=<unknown>, GPU has fallen off the bus.")


def test_first_write_maps_every_pci_id_to_its_uuid(backend: SimulatedBackend, kmsg: Path) -> None:
    backend.inject(0, "xid", "13")
    backend.inject(0, "xid", "31")
    texts = [r[3] for r in records(kmsg)]
    mappings = [MAPPING.match(t) for t in texts if MAPPING.match(t)]
    assert {pci_key(g.pci_bus_id): g.uuid for g in backend.inventory()} == {m[1]: m[2] for m in mappings}
    assert len(texts) == 2 + 2  # the mappings only once


def test_sequence_numbers_continue_after_the_file(tmp_path: Path) -> None:
    kmsg = tmp_path / "kmsg"
    kmsg.write_text("6,41,100,-;some earlier record\n")
    SimulatedBackend(1, kmsg).inject(0, "ecc-dbe")
    SimulatedBackend(1, kmsg).inject(0, "xid", "94")  # a restarted daemon goes on numbering
    seqs = [r[1] for r in records(kmsg)]
    assert seqs == list(range(41, 41 + len(seqs)))
    dbe = [r[3] for r in records(kmsg) if XID.search(r[3])]
    assert "): 48, " in dbe[0] and "): 94, " in dbe[1]


def test_xid_line_names_an_attached_process(backend: SimulatedBackend, kmsg: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        backend.attach(backend.inventory()[0].uuid, child.pid)
        backend.inject(0, "xid", "13")
    finally:
        child.kill()
        child.wait()
    text = records(kmsg)[-1][3]
    assert f"): 13, pid={child.pid}, name={psutil.Process().name()}, Graphics Exception" in text
