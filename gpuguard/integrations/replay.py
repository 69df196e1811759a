"""Mid-epoch resume for an Ultralytics training loader: replay the rest of the interrupted epoch.

A stock Ultralytics loader shuffles with a generator seeded once per
process, so the order of epoch N after a restart is not the order the
interrupted process was using: "the rest of the epoch" cannot be
reproduced, and a resume has to redo the whole epoch. This module swaps the
loader's sampler for one whose every pass (one pass = one epoch of batches)
is a permutation drawn from (seed, label) alone (an unshuffled loader,
`rect=True`, keeps its index order), and keeps a record of the
passes it handed out and of the batches the trainer consumed. A checkpoint
can then say "pass `label`, `done` batches trained", and the resumed process
starts with that same permutation, minus its first `done` batches.

Passes are counted by consumption, not by epoch number: the loader's workers
prefetch into the next pass before the trainer reaches the next epoch,
`reset()` (closing mosaic) throws away prefetched passes, and a NaN recovery
repeats an epoch number. Every pass runs to its end before the next one is
consumed, so "the pass holding consumed batch k" is always well defined.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger("gpuguard.yolo")

RESUME_KEY = "gpuguard_resume"  # in a checkpoint's train_metrics: the Position of a mid-epoch save
SHUFFLED = "numpy-pcg64(seed,label)"  # how a pass's order is drawn; a checkpoint names it so a change is caught
SEQUENTIAL = "sequential"  # an unshuffled loader (rect=True): every pass in index order


@dataclass(frozen=True, slots=True)
class Position:
    """Where in the data an interrupted epoch stopped; what a checkpoint records."""

    label: int  # the pass the epoch was consuming
    done: int  # batches of that pass trained, counted from the pass's first batch
    batches: int  # batches in a whole pass
    samples: int
    batch_size: int
    seed: int
    order: str = SHUFFLED

    def to_json(self) -> dict[str, Any]:
        return {
            "order": self.order, "label": self.label, "done": self.done, "batches": self.batches,
            "samples": self.samples, "batch_size": self.batch_size, "seed": self.seed,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: Any) -> Position | None:
        """None for anything this version did not write (the resume then redoes the epoch)."""
        if not isinstance(data, dict) or data.get("order") not in (SHUFFLED, SEQUENTIAL):
            return None
        try:
            pos = cls(*(int(data[k]) for k in ("label", "done", "batches", "samples", "batch_size", "seed")), data["order"])
        except (KeyError, TypeError, ValueError):
            return None
        return pos if 0 < pos.done < pos.batches and pos.batch_size > 0 else None


@dataclass(slots=True)
class _Pass:
    label: int
    skip: int  # batches left out at its start (a resumed epoch)
    batches: int  # batches it yields


def permutation(samples: int, seed: int, label: int, order: str = SHUFFLED) -> list[int]:
    """The order of one pass: the same for the same (samples, seed, label), in any process."""
    if order == SEQUENTIAL:
        return list(range(samples))
    return np.random.default_rng([seed & 0xFFFFFFFF, label]).permutation(samples).tolist()


class ReplaySampler:
    """The index sampler inside the loader's BatchSampler; see the module docstring."""

    def __init__(
        self, samples: int, batch_size: int, drop_last: bool, seed: int, first_label: int = 0, order: str = SHUFFLED
    ) -> None:
        self.samples = samples
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.seed = seed
        self.order = order
        self._next_label = first_label
        self._skip = 0  # batches the next new pass leaves out
        self._passes: list[_Pass] = []  # since the last reset, in the order handed out
        self._consumed = 0  # batches the trainer took since the last reset
        self._stepped = 0  # of those, how many the last optimizer step took in

    # --- what the loader calls ------------------------------------------
    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        label = self._next_label
        self._next_label += 1
        self._passes.append(_Pass(label, skip, self.batches(skip)))
        yield from permutation(self.samples, self.seed, label, self.order)[skip * self.batch_size :]

    def __len__(self) -> int:
        """Samples in the pass the trainer is about to start: the loader sizes each epoch by it."""
        upcoming = self._pass_at(self._consumed)
        skip = upcoming.skip if upcoming is not None else self._skip
        return self.samples - skip * self.batch_size

    # --- what the trainer's callbacks call ------------------------------
    def batches(self, skip: int = 0) -> int:
        left = self.samples - skip * self.batch_size
        return left // self.batch_size if self.drop_last else -(-left // self.batch_size)

    def resume_at(self, pos: Position) -> None:
        """The next pass is `pos`'s pass, without the batches trained before the checkpoint."""
        self._next_label = pos.label
        self._skip = pos.done

    def consumed(self) -> None:
        """The trainer took one more batch from the loader."""
        self._consumed += 1

    def stepped(self) -> None:
        """The optimizer just stepped: every batch consumed so far is in the weights."""
        self._stepped = self._consumed

    def reset(self) -> None:
        """The loader dropped its iterator (and with it any prefetched pass): counting starts again.

        A pass dropped before any of it was trained is handed out again, so a
        pending resume position survives a reset at the resumed epoch's start.
        """
        if self._consumed == 0 and self._passes:
            self._next_label, self._skip = self._passes[0].label, self._passes[0].skip
        self._passes.clear()
        self._consumed = self._stepped = 0

    def position(self) -> Position | None:
        """The pass and batch of the last batch consumed; None before the first."""
        return self._position_of(self._consumed)

    def position_at_step(self) -> Position | None:
        """Where the last optimizer step left the weights: batches after it are not in them yet."""
        return self._position_of(self._stepped)

    def _position_of(self, consumed: int) -> Position | None:
        if consumed == 0:
            return None
        start = 0
        for p in self._passes:
            if consumed <= start + p.batches:
                done = p.skip + consumed - start
                # a pass trained to its end leaves nothing to replay: train its last batch again
                full = self.batches()
                return Position(p.label, min(done, full - 1), full, self.samples, self.batch_size, self.seed, self.order)
            start += p.batches
        return None  # consumed batches the sampler never handed out: not our loader's

    def _pass_at(self, batch: int) -> _Pass | None:
        start = 0
        for p in self._passes:
            if batch < start + p.batches:
                return p
            start += p.batches
        return None


def install(trainer: Any) -> ReplaySampler | None:
    """Put a ReplaySampler into `trainer.train_loader`; None (logged) where that cannot be done safely."""
    loader = trainer.train_loader
    batch_sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)  # inside _RepeatSampler
    inner = getattr(batch_sampler, "sampler", None)
    orders = {"RandomSampler": SHUFFLED, "SequentialSampler": SEQUENTIAL}
    if type(inner).__name__ not in orders or not hasattr(loader, "reset"):
        # DDP (DistributedSampler), or an Ultralytics version shaped differently
        log.info("mid-epoch replay off (loader sampler %s): a resume redoes the interrupted epoch", type(inner).__name__)
        return None
    sampler = ReplaySampler(
        samples=len(inner),
        batch_size=int(batch_sampler.batch_size),
        drop_last=bool(batch_sampler.drop_last),
        seed=int(getattr(trainer.args, "seed", 0) or 0),
        first_label=int(getattr(trainer, "start_epoch", 0)),
        order=orders[type(inner).__name__],
    )
    batch_sampler.sampler = sampler
    original_reset = loader.reset

    def reset() -> None:
        sampler.reset()
        original_reset()

    loader.reset = reset
    return sampler
