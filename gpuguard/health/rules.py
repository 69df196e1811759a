"""One GPU's verdict from what the sources saw: a pure function.

`evaluate` runs every check (one small module each, see `checks/`) and
combines their findings. No I/O, no clock: the caller passes `now`.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpuguard.config import HealthConfig
from gpuguard.health.checks import ecc, nvml, recovery, remap, thermal, xid
from gpuguard.health.checks.base import Check, Facts, Result
from gpuguard.health.types import Action, GpuState, Severity, Verdict
from gpuguard.nvml.types import GpuSnapshot
from gpuguard.observations import XidObservation

# the order findings are listed in
CHECKS: tuple[Check, ...] = (nvml.check, xid.check, ecc.check, remap.check, thermal.check, recovery.check)

# worse is higher; UNKNOWN outranks DEGRADED because no data must never pass
# for a GPU that merely works less well
STATE_RANK: dict[GpuState, int] = {
    GpuState.HEALTHY: 0,
    GpuState.DEGRADED: 1,
    GpuState.UNKNOWN: 2,
    GpuState.FAULTED: 3,
}
SEVERITY_RANK: dict[Severity, int] = {
    Severity.INFO: 0,
    Severity.WARNING: 1,
    Severity.ERROR: 2,
    Severity.CRITICAL: 3,
}


def evaluate(
    uuid: str,
    snapshot: GpuSnapshot | None,
    *,
    history: Sequence[GpuSnapshot],
    xids: Sequence[XidObservation],
    config: HealthConfig,
    now: float,
) -> Verdict:
    """The verdict for GPU `uuid`.

    `history`: earlier snapshots of this GPU, oldest first (a bounded window).
    `xids`: the Xids the caller still holds active for this GPU.
    """
    facts = Facts(snapshot=snapshot, history=history, xids=xids, config=config, now=now)
    results: list[Result] = [result for check in CHECKS for result in check(facts)]
    return combine(uuid, results)


def combine(uuid: str, results: Sequence[Result]) -> Verdict:
    """The worst state, the strongest action, and the worst finding's
    message as the reason (None when nothing is above info)."""
    findings = tuple(finding for _, finding in results)
    if not results:
        return Verdict(uuid=uuid, state=GpuState.HEALTHY, action=Action.NONE, reason=None)
    state = max((state for state, _ in results), key=STATE_RANK.__getitem__)
    action = max((f.action for f in findings), key=lambda a: a.rank)
    _, worst = max(results, key=_badness)
    reason = worst.message if worst.severity != Severity.INFO else None
    return Verdict(uuid=uuid, state=state, action=action, reason=reason, findings=findings)


def _badness(result: Result) -> tuple[int, int, int]:
    state, finding = result
    return STATE_RANK[state], SEVERITY_RANK[finding.severity], finding.action.rank
