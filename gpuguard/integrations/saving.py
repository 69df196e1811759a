"""How gpuguard's trainer-side checkpoints are written and read back (the trainer's thread).

Ultralytics writes last.pt in place and saves only at epoch ends; these
helpers make its writes atomic, save mid-epoch as "the previous epoch
completed" (where the position cannot be replayed), and load a first epoch's
training state, which Ultralytics' own resume refuses.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from gpuguard.integrations.atomic import replacing, write_bytes_atomic

log = logging.getLogger("gpuguard.yolo")

WRITE_LOCK = threading.RLock()  # held by whoever writes a checkpoint: the trainer's thread or the writer thread


class AtomicPath(type(Path())):  # type: ignore[misc]
    """A checkpoint path whose write_bytes replaces the file atomically.

    Ultralytics calls `self.last.write_bytes(...)`; swapping the trainer's
    path objects for these makes every checkpoint write crash-safe without
    copying its save_model. Paths derived with `/` keep the class, so
    `wdir / "epoch3.pt"` is covered too.
    """

    def write_bytes(self, data: Any) -> int:
        with WRITE_LOCK:
            write_bytes_atomic(Path(self), data)
        return len(data)


class DiscardPath(type(Path())):  # type: ignore[misc]
    """Stands in for best.pt during a mid-epoch save: the write goes nowhere."""

    def write_bytes(self, data: Any) -> int:
        return len(data)


def load_training_state(trainer: Any, path: Path) -> None:
    """Optimizer, AMP scaler and EMA from a checkpoint taken during the first epoch.

    Ultralytics refuses to resume "no epoch completed", so such a run starts
    again from the checkpoint's weights; without this its optimizer (momentum,
    Adam moments) and EMA would start from scratch too.
    """
    import torch

    load = getattr(trainer, "_load_checkpoint_state", None)  # what Ultralytics' own resume calls
    if load is None:
        log.warning("this Ultralytics has no _load_checkpoint_state: optimizer and EMA start afresh")
        return
    load(torch.load(path, map_location="cpu", weights_only=False))
    log.info("first epoch continues with the optimizer, scaler and EMA state of %s", path)


def save_mid_epoch(trainer: Any) -> None:
    """last.pt as "the previous epoch completed"; best.pt and epochN.pt untouched."""
    epoch, best, period = trainer.epoch, trainer.best, trainer.save_period
    trainer.epoch, trainer.best, trainer.save_period = epoch - 1, DiscardPath(best), 0
    try:
        trainer.save_model()
    finally:
        trainer.epoch, trainer.best, trainer.save_period = epoch, best, period


def make_strip_atomic() -> None:
    """final_eval rewrites last.pt/best.pt in place via strip_optimizer; route it through a temp file."""
    import ultralytics.engine.trainer as trainer_module

    original = trainer_module.strip_optimizer
    if getattr(original, "_gpuguard_atomic", False):
        return

    def strip_optimizer(f: str | Path = "best.pt", s: str = "", updates: dict[str, Any] | None = None) -> dict[str, Any]:
        with replacing(Path(s or f)) as tmp:
            return original(f, str(tmp), updates)

    strip_optimizer._gpuguard_atomic = True  # type: ignore[attr-defined]
    trainer_module.strip_optimizer = strip_optimizer
