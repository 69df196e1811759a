"""A simulated backend on a kernel-log file under tmp_path; nothing touches /dev/kmsg or a GPU."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuguard.sim.backend import SimulatedBackend


@pytest.fixture
def kmsg(tmp_path: Path) -> Path:
    return tmp_path / "state" / "simulated-kmsg"


@pytest.fixture
def backend(kmsg: Path) -> Iterator[SimulatedBackend]:
    sim = SimulatedBackend(2, kmsg, timeout_s=0.5)
    sim.open()
    yield sim
    for index in range(2):
        sim.inject(index, "clear")  # releases any lane an nvml-hang still holds
    sim.close()
