"""ECC: uncorrected errors, the corrected-error rate, and retired pages."""

from __future__ import annotations

from collections.abc import Sequence

from gpuguard.events import EventKind
from gpuguard.health.checks.base import Facts, Result
from gpuguard.health.types import Action, Finding, GpuState, Severity
from gpuguard.nvml.types import GpuSnapshot

# a rate over less than this is noise (one burst reads as thousands per hour)
MIN_RATE_SPAN_S = 60.0


def check(facts: Facts) -> list[Result]:
    snap = facts.snapshot
    if snap is None:
        return []
    results: list[Result] = []
    if (snap.ecc_volatile_uncorrected or 0) > 0:
        message = f"{snap.ecc_volatile_uncorrected} uncorrected ECC errors since the last reset: reset the GPU"
        results.append((GpuState.FAULTED, Finding(EventKind.ECC, Severity.CRITICAL, Action.RESET_GPU, message)))
    rate = corrected_rate_per_h(facts.history, snap)
    if rate is not None and rate > facts.config.ecc_corrected_rate_degraded_per_h:
        message = (
            f"corrected ECC errors at {rate:.0f}/h "
            f"(over {facts.config.ecc_corrected_rate_degraded_per_h:g}/h): memory is wearing"
        )
        results.append((GpuState.DEGRADED, Finding(EventKind.ECC, Severity.WARNING, Action.NONE, message)))
    if snap.retired_pages_sbe is not None or snap.retired_pages_dbe is not None:
        retired = (snap.retired_pages_sbe or 0) + (snap.retired_pages_dbe or 0)
        if retired >= facts.config.retired_pages_degraded:
            message = (
                f"{retired} retired memory pages (limit {facts.config.retired_pages_degraded}): "
                "hardware inspection needed"
            )
            results.append((GpuState.DEGRADED, Finding(EventKind.ECC, Severity.WARNING, Action.INSPECT, message)))
    if snap.retired_pages_pending:
        message = "memory page retirement pending: reset the GPU"
        results.append((GpuState.DEGRADED, Finding(EventKind.ECC, Severity.WARNING, Action.RESET_GPU, message)))
    return results


def corrected_rate_per_h(history: Sequence[GpuSnapshot], snap: GpuSnapshot) -> float | None:
    """Volatile corrected ECC errors per hour, from the oldest point after the
    counter last went down (a reset zeroes it) to `snap`; None when the points
    span less than MIN_RATE_SPAN_S or the counter is not available."""
    current = snap.ecc_volatile_corrected
    if current is None:
        return None
    start_value, start_time = current, snap.timestamp
    for earlier in reversed(history):
        value = earlier.ecc_volatile_corrected
        if value is None or value > start_value:
            break
        start_value, start_time = value, earlier.timestamp
    span = snap.timestamp - start_time
    if span < MIN_RATE_SPAN_S:
        return None
    return (current - start_value) / span * 3600.0
