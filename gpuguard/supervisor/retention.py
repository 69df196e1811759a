"""Which snapshots a ring keeps: pure, so the policy is tested without files.

Recent snapshots are kept densely (a rollback usually goes back one step),
older ones sparsely (one per exponential age band), all under a byte cap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, TypeVar


class Retainable(Protocol):
    """What retention needs to know of a snapshot."""

    @property
    def id(self) -> str: ...
    @property
    def seq(self) -> int: ...  # higher is newer
    @property
    def size(self) -> int: ...
    @property
    def created(self) -> float: ...  # epoch seconds


S = TypeVar("S", bound=Retainable)


def band(age_s: float) -> int:
    """Exponential age band: 0 under an hour, then k+1 for [2^k, 2^(k+1)) hours."""
    hours = age_s / 3600.0
    return 0 if hours < 1.0 else int(math.floor(math.log2(hours))) + 1


def select_retained(
    snapshots: Sequence[S], *, now: float, keep_newest: int, max_bytes: int, protect: str | None
) -> list[S]:
    """Which snapshots (newest first in, newest first out) survive retention.

    The newest `keep_newest`, then the oldest in each exponential age band
    (so a kept one ages into the next band instead of being replaced), then
    the oldest go until the total fits `max_bytes`. `protect` (the newest
    valid one) is never dropped.
    """
    kept = list(snapshots[:keep_newest])
    bands_taken: set[int] = set()
    for snap in reversed(snapshots[keep_newest:]):  # oldest first
        b = band(now - snap.created)
        if b not in bands_taken or snap.id == protect:
            bands_taken.add(b)
            kept.append(snap)
    kept.sort(key=lambda s: s.seq, reverse=True)
    total = sum(s.size for s in kept)
    for snap in reversed(list(kept)):
        if total <= max_bytes:
            break
        if snap.id != protect:
            kept.remove(snap)
            total -= snap.size
    return kept
