"""Stable identities of simulated GPUs: the same index gives the same GPU on every start,
so quarantine and event history survive a daemon restart."""

from __future__ import annotations

import uuid

from gpuguard.nvml.types import GpuInfo

NAME = "NVIDIA H100 80GB HBM3 (simulated)"
MEMORY_TOTAL_BYTES = 80 * 1024**3
_NAMESPACE = uuid.UUID("6b1f0c52-58a3-4c1e-9f7e-2f4d3b0a6c11")
# the bus numbers of an 8-GPU HGX H100 board; further boards sit in further PCI domains
_BUSES = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)


def sim_uuid(index: int) -> str:
    """`GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, as NVML spells real ones."""
    return f"GPU-{uuid.uuid5(_NAMESPACE, f'gpuguard-sim-gpu-{index}')}"


def sim_pci_bus_id(index: int) -> str:
    """NVML's spelling, `00000000:3A:00.0`: distinct for every index."""
    domain, slot = divmod(index, len(_BUSES))
    return f"{domain:08X}:{_BUSES[slot]:02X}:00.0"


def sim_serial(index: int) -> str:
    """A 13-digit board serial like the ones real boards report."""
    return str(1650000000000 + uuid.uuid5(_NAMESPACE, f"gpuguard-sim-serial-{index}").int % 10**9)


def sim_info(index: int) -> GpuInfo:
    return GpuInfo(
        index=index,
        uuid=sim_uuid(index),
        pci_bus_id=sim_pci_bus_id(index),
        name=NAME,
        serial=sim_serial(index),
        memory_total_bytes=MEMORY_TOTAL_BYTES,
    )
