from __future__ import annotations

import re
from pathlib import Path

from gpuguard.observations import pci_key
from gpuguard.sim.backend import SimulatedBackend

UUID = re.compile(r"^GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
NVML_PCI = re.compile(r"^[0-9A-F]{8}:[0-9A-F]{2}:00\.0$")


def test_same_count_gives_the_same_gpus_across_restarts(tmp_path: Path) -> None:
    first = SimulatedBackend(4, tmp_path / "kmsg").inventory()
    again = SimulatedBackend(4, tmp_path / "other-kmsg").inventory()
    assert first == again
    assert [g.index for g in first] == [0, 1, 2, 3]


def test_every_gpu_has_its_own_uuid_and_pci_id_in_nvml_spelling(tmp_path: Path) -> None:
    gpus = SimulatedBackend(20, tmp_path / "kmsg").inventory()
    assert len({g.uuid for g in gpus}) == 20
    assert len({pci_key(g.pci_bus_id) for g in gpus}) == 20
    for g in gpus:
        assert UUID.match(g.uuid), g.uuid
        assert NVML_PCI.match(g.pci_bus_id), g.pci_bus_id
        assert g.name.endswith("(simulated)")
        assert g.serial and g.serial.isdigit()
        assert g.memory_total_bytes == 80 * 1024**3


def test_driver_info_is_fixed_and_plausible(tmp_path: Path) -> None:
    info = SimulatedBackend(1, tmp_path / "kmsg").driver_info()
    assert info.driver_version == "550.90.07"
    assert info.cuda_driver_version == "12.4"
    assert info.nvml_version


def test_kind_is_simulated(tmp_path: Path) -> None:
    assert SimulatedBackend(1, tmp_path / "kmsg").kind == "simulated"
