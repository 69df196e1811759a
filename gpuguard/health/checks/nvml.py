"""No data, and NVML outcomes that are health facts (lost, reset required,
errors, calls past their deadline)."""

from __future__ import annotations

from typing import NamedTuple

from gpuguard.events import EventKind
from gpuguard.health.checks.base import Facts, Result
from gpuguard.health.types import Action, Finding, GpuState, Severity
from gpuguard.nvml.types import FindingKind, GpuSnapshot


class _Rule(NamedTuple):
    state: GpuState
    action: Action
    severity: Severity
    kind: EventKind
    text: str


_RULES: dict[FindingKind, _Rule] = {
    FindingKind.GPU_LOST: _Rule(
        GpuState.FAULTED, Action.REBOOT_NODE, Severity.CRITICAL, EventKind.GPU_LOST, "GPU is lost: reboot the node"
    ),
    FindingKind.RESET_REQUIRED: _Rule(
        GpuState.FAULTED, Action.RESET_GPU, Severity.CRITICAL, EventKind.GPU_RESET_REQUIRED,
        "GPU requires a reset: reset the GPU",
    ),
    FindingKind.DEADLINE: _Rule(
        GpuState.UNKNOWN, Action.NONE, Severity.ERROR, EventKind.NVML_TIMEOUT, "NVML did not answer in time"
    ),
    FindingKind.NVML_ERROR: _Rule(
        GpuState.UNKNOWN, Action.NONE, Severity.ERROR, EventKind.NVML_ERROR, "NVML returned an unexpected error"
    ),
}


WEDGED = "NVML wedged"  # how a wedge's message (and so the exclusion reason it causes) starts


def _missed(snap: GpuSnapshot) -> bool:
    return any(f.kind == FindingKind.DEADLINE for f in snap.findings)


def _wedged(facts: Facts) -> Result | None:
    """NVML past its deadline on every poll for nvml_wedged_after_s: what a GPU that fell
    off the bus or a wedged driver looks like; its jobs must move, not wait for good."""
    snap = facts.snapshot
    if snap is None or not _missed(snap):
        return None
    since = snap.timestamp
    for old in reversed(facts.history):
        if not _missed(old):
            break
        since = old.timestamp
    silent_s = facts.now - since
    if silent_s < facts.config.nvml_wedged_after_s:
        return None
    message = f"{WEDGED}: no answer within the deadline for {silent_s:.0f}s: treated as lost until NVML answers and probation passes"
    return GpuState.FAULTED, Finding(EventKind.NVML_WEDGED, Severity.CRITICAL, Action.REBOOT_NODE, message)


def check(facts: Facts) -> list[Result]:
    """One finding per NVML finding kind, naming the calls; UNKNOWN without a
    snapshot, since no data must never read as healthy."""
    snap = facts.snapshot
    if snap is None:
        missing = Finding(EventKind.NO_DATA, Severity.ERROR, Action.NONE, "no data from NVML for this GPU")
        return [(GpuState.UNKNOWN, missing)]
    results: list[Result] = []
    for kind, rule in _RULES.items():
        calls = sorted({f.call for f in snap.findings if f.kind == kind})
        if calls:
            message = f"{rule.text} (seen in {', '.join(calls)})"
            results.append((rule.state, Finding(rule.kind, rule.severity, rule.action, message)))
    wedged = _wedged(facts)
    if wedged is not None:
        results.append(wedged)
    return results
