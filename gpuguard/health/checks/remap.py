"""Row remapping: a pending remap needs a reset; a failed one needs hands."""

from __future__ import annotations

from gpuguard.events import EventKind
from gpuguard.health.checks.base import Facts, Result
from gpuguard.health.types import Action, Finding, GpuState, Severity


def check(facts: Facts) -> list[Result]:
    snap = facts.snapshot
    if snap is None:
        return []
    results: list[Result] = []
    if snap.remap_pending:
        message = "row remapping pending: reset the GPU"
        results.append((GpuState.DEGRADED, Finding(EventKind.REMAP, Severity.WARNING, Action.RESET_GPU, message)))
    if snap.remap_failure:
        message = "row remapping failed: hardware inspection needed"
        results.append((GpuState.FAULTED, Finding(EventKind.REMAP, Severity.CRITICAL, Action.INSPECT, message)))
    return results
