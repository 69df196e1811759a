"""Driver reports that span records: joined per GPU (PCI address) across the
unrelated records that come in between, within a bounded window."""

from __future__ import annotations

from gpuguard.kmsg.parser import KernelLogParser, PciMapping, parse_record
from gpuguard.observations import XidObservation

from .nvrm_lines import BOOT, NOW

UUID = "GPU-509665ad-b600-ac93-3616-d754b23d636d"
PROBE_TEXT = (
    "The NVIDIA GPU 0000:b3:00.0 (PCI ID: 10de:26b5) installed in this system has "
    "fallen off the bus and is not responding to commands."
)


def feed_all(lines: list[str]) -> list[XidObservation | PciMapping]:
    parser = KernelLogParser(boot_time=BOOT)
    out = []
    for line in lines:
        record = parse_record(line)
        if record is not None and (found := parser.feed(record, now=NOW)) is not None:
            out.append(found)
    return out


def xids(found: list[XidObservation | PciMapping]) -> list[tuple[int, str | None]]:
    return [(f.xid, f.pci_bus_id) for f in found if isinstance(f, XidObservation)]


def test_dmesg_multi_line_fallen_off_message_is_joined_once() -> None:
    found = feed_all(
        [
            "[ 1843.308145] NVRM: The NVIDIA GPU 0000:b3:00.0",
            "               NVRM: (PCI ID: 10de:26b5) installed in this system has",
            "               NVRM: fallen off the bus and is not responding to commands.",
            "               NVRM: (a further indented line)",
            "[ 1843.439662] NVRM: The NVIDIA probe routine failed for 1 device(s).",
        ]
    )
    assert len(found) == 1
    obs = found[0]
    assert isinstance(obs, XidObservation)
    assert (obs.xid, obs.pci_bus_id, obs.timestamp) == (79, "0000:b3:00", BOOT + 1843.308145)
    assert obs.message == PROBE_TEXT


def test_fallen_off_message_split_over_records_by_older_kernels() -> None:
    found = feed_all(
        [
            "3,10,100,-;NVRM: The NVIDIA GPU 0000:b3:00.0",
            "3,11,101,-;NVRM: (PCI ID: 10de:26b5) installed in this system has",
            "3,12,102,-;NVRM: fallen off the bus and is not responding to commands.",
            "3,13,103,-;NVRM: Xid (PCI:0000:3b:00): 13, Graphics Exception",
        ]
    )
    assert xids(found) == [(79, "0000:b3:00"), (13, "0000:3b:00")]


def test_probe_report_is_joined_across_unrelated_records() -> None:
    found = feed_all(
        [
            "3,10,1000000,-;NVRM: The NVIDIA GPU 0000:b3:00.0",
            "4,11,1000100,-;pcieport 0000:b0:02.0: AER: Uncorrected (Fatal) error received: 0000:b3:00.0",
            "14,12,1000150,-;some user-space line written to /dev/kmsg",
            "3,13,1000200,-;NVRM: (PCI ID: 10de:26b5) installed in this system has",
            "6,14,1000250,-;e1000e 0000:00:1f.6 eth0: NIC Link is Up 1000 Mbps Full Duplex",
            "3,15,1000300,-;NVRM: fallen off the bus and is not responding to commands.",
            "6,16,1000400,-;nvidia: probe of 0000:b3:00.0 failed with error -1",
        ]
    )
    assert len(found) == 1 and isinstance(found[0], XidObservation)
    assert (found[0].xid, found[0].pci_bus_id, found[0].timestamp) == (79, "0000:b3:00", BOOT + 1.0)
    assert found[0].message == PROBE_TEXT


def test_old_driver_report_without_an_xid_line_is_joined_across_unrelated_records() -> None:
    found = feed_all(
        [
            f"6,20,500000,-;NVRM: GPU at PCI:0000:3b:00: {UUID}",
            "6,21,500100,-;usb 1-1: new high-speed USB device number 2 using xhci_hcd",
            "6,22,500200,-;NVRM: GPU Board Serial Number: 1650124014249",
            "4,23,500300,-;pcieport 0000:3a:00.0: AER: Corrected error received: 0000:3a:00.0",
            "3,24,500400,-;NVRM: GPU has fallen off the bus.",
        ]
    )
    assert found[0] == PciMapping(pci_bus_id="0000:3b:00", uuid=UUID)
    assert xids(found) == [(79, "0000:3b:00")]
    assert found[1].message.endswith("GPU has fallen off the bus.")


def test_xid_79_report_with_unrelated_records_in_between_yields_one_xid_79() -> None:
    found = feed_all(
        [
            f"6,30,500000,-;NVRM: GPU at PCI:0000:3b:00: {UUID}",
            "6,31,500050,-;usb 1-1: new high-speed USB device number 2 using xhci_hcd",
            "6,32,500100,-;NVRM: GPU Board Serial Number: 1650124014249",
            "3,33,500200,-;NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, name=python, GPU has fallen off the bus.",
            "4,34,500250,-;pcieport 0000:3a:00.0: AER: Corrected error received: 0000:3a:00.0",
            "3,35,500300,-;NVRM: GPU 0000:3b:00.0: GPU has fallen off the bus.",
            "3,36,500350,-;NVRM: GPU has fallen off the bus.",
        ]
    )
    assert xids(found) == [(79, "0000:3b:00")]
    obs = found[1]
    assert isinstance(obs, XidObservation) and (obs.pid, obs.process_name) == (1234, "python")


def test_reports_are_kept_per_gpu() -> None:
    found = feed_all(
        [
            "3,40,100,-;NVRM: Xid (PCI:0000:3b:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.",
            "3,41,101,-;NVRM: The NVIDIA GPU 0000:b3:00.0",
            "3,42,102,-;NVRM: (PCI ID: 10de:26b5) installed in this system has",  # goes on b3's report
            "3,43,103,-;NVRM: fallen off the bus and is not responding to commands.",
            "3,44,104,-;NVRM: GPU 0000:3b:00.0: GPU has fallen off the bus.",  # 3b's report said it already
        ]
    )
    assert xids(found) == [(79, "0000:3b:00"), (79, "0000:b3:00")]


def test_a_line_that_names_no_gpu_goes_on_the_gpu_named_last() -> None:
    found = feed_all(
        [
            "3,50,100,-;NVRM: The NVIDIA GPU 0000:b3:00.0",
            "3,51,101,-;NVRM: GPU at PCI:0000:3b:00: " + UUID,
            "3,52,102,-;NVRM: fallen off the bus and is not responding to commands.",
        ]
    )
    assert xids(found) == [(79, "0000:3b:00")]


def test_a_driver_xid_line_always_comes_out() -> None:
    line = "3,{seq},100,-;NVRM: Xid (PCI:0000:3b:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus."
    assert xids(feed_all([line.format(seq=1), line.format(seq=2)])) == [(79, "0000:3b:00")] * 2


def test_a_report_is_not_joined_past_its_window() -> None:
    unrelated = [f"6,{seq},100,-;usb 1-1: unrelated record {seq}" for seq in range(11, 30)]
    found = feed_all(
        [
            "3,10,100,-;NVRM: The NVIDIA GPU 0000:b3:00.0",
            *unrelated,
            "3,30,100,-;NVRM: fallen off the bus and is not responding to commands.",
        ]
    )
    assert found == []


def test_a_line_that_names_no_gpu_and_has_no_report_is_nothing() -> None:
    assert feed_all(["3,1,100,-;NVRM: GPU has fallen off the bus."]) == []
    assert feed_all(["               NVRM: fallen off the bus and is not responding to commands."]) == []
