"""What a job should do about the GPUs under it: a pure function of their
verdicts. The supervisor carries the decision out."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from gpuguard.health.types import Action, GpuState
from gpuguard.supervisor.ports import GpuFacts


class Reaction(enum.StrEnum):
    RESTART_SAME = "restart_same"  # checkpoint, restart on the same GPUs (restart-the-app Xids)
    MOVE = "move"  # checkpoint, stop, restart on healthy GPUs; the bad GPU leaves the pool
    MIGRATE = "migrate"  # degraded: move at the job's pace, only if healthy GPUs are free


@dataclass(frozen=True, slots=True)
class Decision:
    reaction: Reaction
    gpu: str  # the GPU that caused it
    reason: str
    exclude: bool = False  # take the GPU out of the pool
    reset: bool = False  # try a reset once the job is off it
    node_hook: bool = False  # the node needs attention (reboot class)
    key: tuple[object, ...] = ()  # identifies the fault, so it is acted on once

    @property
    def gpu_lost(self) -> bool:
        """The GPU runs nothing any more (a reboot-class fault: off the bus, lost to NVML), so a
        job on it cannot finish its batch to answer: the fault note tells it (gpuguard/fault.py)."""
        return self.node_hook


def decide(gpus: Sequence[GpuFacts], *, migrate_on_degraded: bool, handled: frozenset[tuple[object, ...]]) -> Decision | None:
    """The strongest reaction any of the job's GPUs calls for, or None.

    Faulted beats excluded beats a restart-the-app Xid beats degraded.
    `handled` holds the keys already acted on in this attempt.
    """
    candidates: list[tuple[int, Decision]] = []
    for gpu in gpus:
        reason = gpu.reason or gpu.state.value
        if gpu.state == GpuState.FAULTED:
            decision = Decision(
                Reaction.MOVE,
                gpu.uuid,
                reason,
                exclude=True,
                reset=gpu.action == Action.RESET_GPU,
                node_hook=gpu.action == Action.REBOOT_NODE,
                key=("faulted", gpu.uuid),
            )
            candidates.append((0, decision))
        elif gpu.state in (GpuState.EXCLUDED, GpuState.RESETTING):
            candidates.append((1, Decision(Reaction.MOVE, gpu.uuid, reason, key=("excluded", gpu.uuid))))
        elif (key := app_xid_key(gpu)) is not None:
            xids = ", ".join(str(x) for x in sorted({x for x, _ in gpu.app_xids}))
            candidates.append((2, Decision(Reaction.RESTART_SAME, gpu.uuid, f"Xid {xids}: {reason}", key=key)))
        elif gpu.state == GpuState.DEGRADED and migrate_on_degraded:
            candidates.append((3, Decision(Reaction.MIGRATE, gpu.uuid, reason, key=("degraded", gpu.uuid))))
    for _, decision in sorted(candidates, key=lambda c: c[0]):
        if decision.key not in handled:
            return decision
    return None


def app_xid_key(gpu: GpuFacts) -> tuple[object, ...] | None:
    """The key of the newest restart-the-app Xid on this GPU (a newer Xid makes a new key), or None.

    The supervisor marks the keys present when an attempt starts as handled:
    those Xids happened before that attempt and are not its business.
    """
    if not gpu.app_xids:
        return None
    return ("app_xid", gpu.uuid, max(ts for _, ts in gpu.app_xids))


def backoff_s(crashes: int, initial_s: float, max_s: float) -> float:
    """Exponential crash-loop backoff: initial, 2x, 4x, ... capped at max."""
    if crashes <= 0:
        return 0.0
    return min(max_s, initial_s * 2 ** (crashes - 1))
