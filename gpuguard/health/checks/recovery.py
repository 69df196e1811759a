"""The driver's own verdict: NVML's GPU recovery-action field (driver 570+)."""

from __future__ import annotations

from gpuguard.events import EventKind
from gpuguard.health import xid as catalog
from gpuguard.health.checks.base import Facts, Result, state_for
from gpuguard.health.types import Action, Finding


def check(facts: Facts) -> list[Result]:
    snap = facts.snapshot
    if snap is None or snap.recovery_action is None:
        return []
    meaning, action, severity = catalog.recovery_action(snap.recovery_action)
    if action == Action.NONE:
        return []
    message = f"driver asks for recovery action {snap.recovery_action}: {meaning}"
    return [(state_for(action, severity), Finding(EventKind.RECOVERY_ACTION, severity, action, message))]
