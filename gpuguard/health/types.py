"""What the health rules say about a GPU: its state, why, and what to do."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class GpuState(enum.StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"  # works, but is getting worse: move work off it
    FAULTED = "faulted"  # must not run work
    EXCLUDED = "excluded"  # quarantined by an operator or the supervisor
    RESETTING = "resetting"
    UNKNOWN = "unknown"  # no data: never read as healthy


# states a node health check treats as "this node is not fit for work"
UNHEALTHY_STATES = frozenset({GpuState.FAULTED, GpuState.EXCLUDED, GpuState.RESETTING, GpuState.UNKNOWN})


class Action(enum.StrEnum):
    """The recommended action, ordered from mildest to strongest."""

    NONE = "none"
    RESTART_APP = "restart_app"
    RESET_GPU = "reset_gpu"
    REBOOT_NODE = "reboot_node"
    INSPECT = "hardware_inspection"
    UNKNOWN = "unknown"  # e.g. an Xid missing from the catalog

    @property
    def rank(self) -> int:
        return _ACTION_RANK[self]


_ACTION_RANK = {
    Action.NONE: 0,
    Action.RESTART_APP: 1,
    Action.UNKNOWN: 2,
    Action.RESET_GPU: 3,
    Action.REBOOT_NODE: 4,
    Action.INSPECT: 5,
}


class Severity(enum.StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


@dataclass(frozen=True, slots=True)
class Finding:
    """One reason behind a verdict. `kind` is an event kind of the contract
    (xid, ecc, remap, hang, gpu_lost, thermal, ...)."""

    kind: str
    severity: Severity
    action: Action
    message: str
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    uuid: str
    state: GpuState
    action: Action
    reason: str | None  # the worst finding's message; None when healthy
    findings: tuple[Finding, ...] = ()
