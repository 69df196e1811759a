"""The batch index and optimizer-step cadence of a resumed run, as the uninterrupted run counts them.

Ultralytics computes the warm-up learning rate and momentum of every batch
from `ni = i + nb * epoch`, with `i` from `enumerate(train_loader)`, and steps
the optimizer when `ni - last_opt_step >= accumulate`, with `last_opt_step` a
local of `_do_train` that starts at -1 in every process. A resumed epoch that
skips its first `done` batches (replay.py) starts `i` at 0 again, and a
resumed process would step at its first batch whatever the interrupted run
had accumulated. The clock keeps the true index and the true last step
(carried in the checkpoint): just before each optimizer step of a resumed
partial epoch it sets lr and momentum to what the uninterrupted run used,
and in a resumed process it decides when to step (`enforce`): a step the
trainer asks for too early is skipped, a step it misses is taken at the
batch end. Same formulas as `_do_train`.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class StepClock:
    """Counts batches the way the uninterrupted run's `ni` does."""

    def __init__(self) -> None:
        self.nb = 0  # batches in a whole epoch
        self.acc0 = 1  # the nominal gradient accumulation warm-up ramps up to
        self.skip = 0  # batches of the current epoch trained before this process started
        self.index = -1  # 0-based batch index within the epoch, counting the skipped ones
        self.last_opt_ni = -1  # the true index of the batch of the last optimizer step
        self.enforce = False  # keep the interrupted run's cadence (a process resumed from an exact state)
        self.stepped_now = False  # the optimizer stepped during the batch in progress

    def start(self, trainer: Any) -> None:
        """At on_train_start, before a resume shortens the first epoch."""
        self.nb = len(trainer.train_loader)
        self.acc0 = trainer.accumulate

    def epoch_start(self, skip: int) -> None:
        self.skip, self.index = skip, skip - 1

    def batch_start(self) -> None:
        self.index += 1
        self.stepped_now = False

    def accumulate(self, trainer: Any) -> int:
        """Batches per optimizer step at the current batch (warm-up ramps it from 1 to the nominal)."""
        ni, nw = self.ni(trainer), trainer._get_warmup_iterations(self.nb)
        if nw and ni <= nw:
            return max(1, int(np.interp(ni, [0, nw], [1, self.acc0]).round()))
        return self.acc0

    def due(self, trainer: Any) -> bool:
        """Would the uninterrupted run step the optimizer at this batch?"""
        return self.ni(trainer) - self.last_opt_ni >= self.accumulate(trainer)

    def stepped(self, trainer: Any) -> None:
        self.last_opt_ni, self.stepped_now = self.ni(trainer), True

    def last_batch(self) -> bool:
        """Is the batch in progress the epoch's last?"""
        return self.index + 1 >= self.nb

    def ni(self, trainer: Any) -> int:
        return self.index + self.nb * trainer.epoch

    def fix_warmup(self, trainer: Any) -> None:
        """In a resumed partial epoch's warm-up: the lr and momentum of the true batch index."""
        if not self.skip:
            return
        ni, nw = self.ni(trainer), trainer._get_warmup_iterations(self.nb)
        if not nw or ni > nw:
            return
        args, xi = trainer.args, [0, nw]
        for group in trainer.optimizer.param_groups:
            start = args.warmup_bias_lr if group.get("param_group") == "bias" else 0.0
            group["lr"] = float(np.interp(ni, xi, [start, group["initial_lr"] * trainer.lf(trainer.epoch)]))
            if "momentum" in group:
                group["momentum"] = float(np.interp(ni, xi, [args.warmup_momentum, args.momentum]))
