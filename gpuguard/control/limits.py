"""How many control connections each user may hold, so no user can starve the socket.

One global limit let a single user, with idle connections or a connect/close
loop, take every slot and make `gpuguardctl check` fail (issue #14). Slots are
counted per uid (from SO_PEERCRED) in two lanes:

- the full lane serves any command on a kept-alive connection: up to `total`
  connections; root may use all of them, any other uid at most `per_uid`, and
  all other uids together leave `root_reserved` of them to root;
- a connection the full lane cannot take may still get a quick-lane slot
  (`quick` of them, at most `quick_per_uid` per uid): one `check` or `status`
  answered within a short deadline, then closed, so a health check gets
  through while another user holds or churns connections.

Anything beyond both lanes is answered "busy" at once and closed.
"""

from __future__ import annotations

import enum
import threading
from collections import Counter
from dataclasses import dataclass

# what the quick lane answers: the read-only commands a health check needs
QUICK_COMMANDS = frozenset({"check", "status"})


class Lane(enum.Enum):
    FULL = "full"
    QUICK = "quick"


@dataclass(frozen=True, slots=True)
class Limits:
    total: int = 64
    per_uid: int = 16
    root_reserved: int = 16
    quick: int = 16
    quick_per_uid: int = 4
    quick_timeout_s: float = 1.0  # the quick lane's one request line must arrive this soon

    def __post_init__(self) -> None:
        if not 0 <= self.root_reserved <= self.total or min(self.per_uid, self.quick, self.quick_per_uid) < 0:
            raise ValueError(f"inconsistent control connection limits: {self}")
        if self.quick_timeout_s <= 0:
            raise ValueError("quick_timeout_s must be positive")


class Admission:
    """The connections each uid holds now, per lane (thread-safe)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._held = {Lane.FULL: Counter[int](), Lane.QUICK: Counter[int]()}
        self._lock = threading.Lock()

    def admit(self, uid: int) -> Lane | None:
        """Take a slot for a new connection of `uid`; None when it gets none."""
        lim = self.limits
        with self._lock:
            full, quick = self._held[Lane.FULL], self._held[Lane.QUICK]
            in_full = full.total()
            if uid == 0:
                fits = in_full < lim.total
            else:
                fits = in_full < lim.total - lim.root_reserved and full[uid] < lim.per_uid
            lane = Lane.FULL if fits else None
            if lane is None and quick.total() < lim.quick and quick[uid] < lim.quick_per_uid:
                lane = Lane.QUICK
            if lane is not None:
                self._held[lane][uid] += 1
            return lane

    def release(self, uid: int, lane: Lane) -> None:
        """Give back the slot `admit` gave."""
        with self._lock:
            held = self._held[lane]
            held[uid] -= 1
            if held[uid] <= 0:
                del held[uid]
