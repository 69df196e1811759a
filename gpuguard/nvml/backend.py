"""The interface every GPU backend offers: the real NVML one and the simulator."""

from __future__ import annotations

from typing import Literal, Protocol

from gpuguard.nvml.types import DriverInfo, GpuInfo, GpuSnapshot, NvmlEvent


class Simulator(Protocol):
    """What only simulated GPUs can do: faults on request, holders set by hand,
    a reset done in-process."""

    def inject(self, index: int, fault: str, value: str | None = None) -> str:
        """Inject a fault; ValueError names what is wrong with the request."""

    def attach(self, uuid: str, pid: int) -> None:
        """Show pid as a process on the GPU."""

    def detach(self, uuid: str, pid: int) -> None:
        """Stop showing pid on the GPU (ValueError when it was not shown)."""

    def reset(self, index: int) -> tuple[bool, str]: ...


class Backend(Protocol):
    """What the daemon needs from a GPU backend.

    No method may block past the backend's deadline: a call that overruns is
    reported as a `FindingKind.DEADLINE` finding in the snapshot, not waited on.
    """

    kind: Literal["nvml", "simulated"]
    simulator: Simulator | None  # the simulator's extra powers; None on real GPUs

    def open(self) -> None:
        """Initialise (nvmlInit). Raises `BackendUnavailable` when no driver is there."""

    def close(self) -> None:
        """Release every NVML handle (nvmlShutdown); a GPU reset needs this."""

    def driver_info(self) -> DriverInfo: ...

    def inventory(self) -> list[GpuInfo]:
        """All GPUs, ordered by index."""

    def poll(self) -> list[GpuSnapshot]:
        """One snapshot per GPU of the inventory, all taken within one deadline."""

    def wait_events(self, timeout_s: float) -> list[NvmlEvent]:
        """Block up to timeout_s for NVML events; [] when none or unsupported."""


class BackendUnavailable(RuntimeError):
    """No NVIDIA driver / NVML library: the daemon suggests --simulate."""
