"""Which GPUs a job gets: pure functions of the facts and of who holds what."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from gpuguard.health.types import GpuState
from gpuguard.supervisor.ports import Facts


def free_gpus(facts: Facts, taken: Collection[str]) -> list[str]:
    """Healthy GPUs nobody holds: unsuspected ones first, each group in index order
    (a suspect GPU is used only when no other is free)."""
    ordered = sorted(facts.values(), key=lambda f: (f.suspect, f.index))
    return [f.uuid for f in ordered if f.uuid not in taken and f.state == GpuState.HEALTHY]


def pick_gpus(
    free: Sequence[str], preferred: Sequence[str], wanted: int, min_gpus: int | None, avoid: Collection[str] = ()
) -> list[str] | None:
    """`wanted` GPUs, the job's previous ones first (it stays where it was when that is
    fine); at least `min_gpus` when that many are free; None when it cannot start.
    `free` comes ordered best first; a GPU in `avoid` (suspect) is not kept just because
    the job ran there: it comes after every clean GPU."""
    kept = [g for g in preferred if g in free and g not in avoid]
    ordered = kept + [g for g in free if g not in kept]
    if len(ordered) >= wanted:
        return ordered[:wanted]
    if min_gpus is not None and len(ordered) >= min_gpus:
        return ordered
    return None
