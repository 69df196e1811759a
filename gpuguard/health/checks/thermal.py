"""Temperature, and hardware slowdown held long enough to matter.

A single poll showing HW slowdown or power brake is a blip (a power
transient); only one seen in every poll for `hw_slowdown_degraded_s` counts.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpuguard.events import EventKind
from gpuguard.health.checks.base import Facts, Result
from gpuguard.health.types import Action, Finding, GpuState, Severity
from gpuguard.nvml.types import GpuSnapshot


def check(facts: Facts) -> list[Result]:
    snap = facts.snapshot
    if snap is None:
        return []
    config = facts.config
    results: list[Result] = []
    temp = snap.temperature_c
    if temp is not None and temp >= config.temperature_faulted_c:
        message = f"temperature {temp} C (limit {config.temperature_faulted_c} C): hardware inspection needed"
        results.append((GpuState.FAULTED, Finding(EventKind.THERMAL, Severity.CRITICAL, Action.INSPECT, message)))
    elif temp is not None and temp >= config.temperature_degraded_c:
        message = f"temperature {temp} C (over {config.temperature_degraded_c} C)"
        results.append((GpuState.DEGRADED, Finding(EventKind.THERMAL, Severity.WARNING, Action.NONE, message)))
    held = slowdown_held_s(facts.history, snap, facts.now)
    if held is not None and held >= config.hw_slowdown_degraded_s:
        message = f"hardware slowdown or power brake held for {held:.0f} s: clocks are throttled"
        results.append((GpuState.DEGRADED, Finding(EventKind.THERMAL, Severity.WARNING, Action.NONE, message)))
    return results


def _slowed(snap: GpuSnapshot) -> bool:
    return bool(snap.hw_slowdown) or bool(snap.power_brake)


def slowdown_held_s(history: Sequence[GpuSnapshot], snap: GpuSnapshot, now: float) -> float | None:
    """How long HW slowdown or power brake has shown in every poll up to
    `snap`, measured from the oldest poll of that unbroken run; None when
    `snap` does not show it."""
    if not _slowed(snap):
        return None
    since = snap.timestamp
    for earlier in reversed(history):
        if not _slowed(earlier):
            break
        since = earlier.timestamp
    return now - since
