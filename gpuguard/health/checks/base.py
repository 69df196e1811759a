"""The one interface every check implements, and the words they share."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gpuguard.config import HealthConfig
from gpuguard.health.types import Action, Finding, GpuState, Severity
from gpuguard.nvml.types import GpuSnapshot
from gpuguard.observations import XidObservation


@dataclass(frozen=True, slots=True)
class Facts:
    """Everything a check may read about one GPU at one moment."""

    snapshot: GpuSnapshot | None  # None: no data this time
    history: Sequence[GpuSnapshot]  # earlier snapshots of this GPU, oldest first
    xids: Sequence[XidObservation]  # the Xids the caller still holds active
    config: HealthConfig
    now: float


Result = tuple[GpuState, Finding]
Check = Callable[[Facts], list[Result]]

ACTION_TEXT: dict[Action, str] = {
    Action.NONE: "no action needed",
    Action.RESTART_APP: "restart the application",
    Action.RESET_GPU: "reset the GPU",
    Action.REBOOT_NODE: "reboot the node",
    Action.INSPECT: "hardware inspection needed",
    Action.UNKNOWN: "action unknown",
}


def state_for(action: Action, severity: Severity) -> GpuState:
    """The GPU state implied by an action asked for by the hardware (an Xid or
    the recovery-action field): restarting the app leaves the GPU usable; an
    unknown action is never healthy; a reset, reboot or inspection takes the
    GPU out of service unless it is only a warning (it may drain first)."""
    if action in (Action.NONE, Action.RESTART_APP):
        return GpuState.HEALTHY
    if action == Action.UNKNOWN or severity != Severity.CRITICAL:
        return GpuState.DEGRADED
    return GpuState.FAULTED
