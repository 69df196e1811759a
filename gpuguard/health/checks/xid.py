"""Xids, read through NVIDIA's catalog.

An Xid read back from earlier in this boot (`historical`) acts only while
the GPU still shows a current fault; otherwise an old, since-fixed error
would keep a good GPU out of service after a daemon restart.
"""

from __future__ import annotations

from gpuguard.events import EventKind
from gpuguard.health import xid as catalog
from gpuguard.health.checks.base import ACTION_TEXT, Facts, Result, state_for
from gpuguard.health.types import Action, Finding
from gpuguard.nvml.types import FindingKind, GpuSnapshot
from gpuguard.observations import XidObservation

_FAULT_RECOVERY_ACTIONS = (1, 2, 4)


def shows_current_fault(snap: GpuSnapshot | None) -> bool:
    """Whether the GPU shows, right now, a fault a past Xid could explain."""
    if snap is None:
        return False
    return (
        snap.has(FindingKind.GPU_LOST)
        or snap.has(FindingKind.RESET_REQUIRED)
        or bool(snap.remap_pending)
        or bool(snap.retired_pages_pending)
        or snap.recovery_action in _FAULT_RECOVERY_ACTIONS
        or (snap.ecc_volatile_uncorrected or 0) > 0
    )


def check(facts: Facts) -> list[Result]:
    """One finding per acting Xid code, in code order."""
    recovery = facts.snapshot.recovery_action if facts.snapshot is not None else None
    historical_acts = shows_current_fault(facts.snapshot)
    acting: dict[int, list[XidObservation]] = {}
    for obs in facts.xids:
        if obs.historical and not historical_acts:
            continue
        info = catalog.lookup(obs.xid)
        action, _ = catalog.resolve(info, recovery)
        if action == Action.RESTART_APP and facts.now - obs.timestamp > facts.config.restart_app_window_s:
            continue  # the app restart it asked for is over
        acting.setdefault(obs.xid, []).append(obs)
    results: list[Result] = []
    for code in sorted(acting):
        info = catalog.lookup(code)
        action, severity = catalog.resolve(info, recovery)
        message = f"Xid {code} ({info.description}): {_advice(info, action, recovery)}"
        if len(acting[code]) > 1:
            message += f" (seen {len(acting[code])} times)"
        results.append((state_for(action, severity), Finding(EventKind.XID, severity, action, message, xid=code)))
    return results


def _advice(info: catalog.XidInfo, action: Action, recovery: int | None) -> str:
    if info.follows_recovery_action:
        meaning, _, _ = catalog.recovery_action(recovery)
        return f"{ACTION_TEXT[action]} (recovery action {recovery}: {meaning})"
    return ACTION_TEXT[action]
