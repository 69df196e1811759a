"""The training state a resume needs to continue bit for bit, carried inside a checkpoint.

An Ultralytics checkpoint is made to be small, not exact: it holds the EMA
in fp16, no training weights at all (a resume trains on from the EMA), the
optimizer state in fp16 and no random-number states. A run resumed from it
drifts away from the uninterrupted one at the first step. gpuguard adds,
under `train_metrics[STATE_KEY]` (the one dict `save_model` passes through
untouched), the full-precision training weights, EMA, optimizer and scaler
states, the random states (rng.py), the gradients accumulated since the last
optimizer step and that step's batch index (steps.py); a resumed run loads
them over what Ultralytics restored. Where the exact state is missing (a checkpoint from
plain `yolo train`) the resume is Ultralytics' own, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from gpuguard.integrations import rng
from gpuguard.integrations.saving import WRITE_LOCK

log = logging.getLogger("gpuguard.yolo")

STATE_KEY = "gpuguard_state"
VERSION = 1


def live_state(trainer: Any, last_opt_ni: int) -> dict[str, Any]:
    """The trainer's state now, referencing its live tensors: serialize it before the next step."""
    return {
        "version": VERSION,
        "model": _unwrap(trainer.model).state_dict(),
        "ema": trainer.ema.ema.state_dict(),
        "updates": int(trainer.ema.updates),
        "optimizer": trainer.optimizer.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        rng.KEY: rng.capture(trainer),
        "grads": pending_grads(trainer),
        "last_opt_ni": last_opt_ni,
    }


def pending_grads(trainer: Any) -> dict[str, Any]:
    """Gradients of the batches since the last optimizer step (the step clears them)."""
    return {
        name: p.grad for name, p in _unwrap(trainer.model).named_parameters() if p.grad is not None and bool(p.grad.any())
    }


def read_state(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The exact state a checkpoint carries; None if it has none this version understands."""
    state = (ckpt.get("train_metrics") or {}).get(STATE_KEY)
    return state if isinstance(state, dict) and state.get("version") == VERSION else None


def restore_training_state(trainer: Any, state: dict[str, Any]) -> None:
    """Weights, EMA, optimizer and scaler exactly as saved (after Ultralytics' own, lossy, restore)."""
    _unwrap(trainer.model).load_state_dict(state["model"])
    trainer.ema.ema.load_state_dict(state["ema"])
    trainer.ema.updates = state["updates"]
    saved = state["optimizer"]
    for group, live in zip(saved["param_groups"], trainer.optimizer.param_groups):
        group["fused"] = live.get("fused")  # the device in use picks the kernel, as Ultralytics does
    trainer.optimizer.load_state_dict(saved)
    trainer.scaler.load_state_dict(state["scaler"])


def restore_pending(trainer: Any, state: dict[str, Any]) -> list[str]:
    """Just before the first batch (the trainer zeroes gradients before it): the random states and
    the gradients accumulated before the checkpoint. Returns the random states not restored."""
    grads = state["grads"]
    for name, p in _unwrap(trainer.model).named_parameters():
        if name in grads:
            p.grad = grads[name].to(p.device).clone()
    return rng.restore(state[rng.KEY], trainer)


@contextmanager
def carried_in_metrics(trainer: Any, extra: dict[str, Any]) -> Iterator[None]:
    """Let `save_model` write `extra` into train_metrics; the live metrics stay as they were."""
    metrics = trainer.metrics
    trainer.metrics = {**metrics, **extra}
    try:
        yield
    finally:
        trainer.metrics = metrics


def wrap_save_model(trainer: Any, state: Callable[[], dict[str, Any] | None], saved: Callable[[], None]) -> None:
    """Checkpoints carry `state()` (None: none); `saved` runs after each save.

    The save that ends training is left as Ultralytics writes it: it is
    stripped by final_eval and never resumed. The write lock is held
    throughout, so the writer thread cannot slip an older copy in between.
    """
    original = trainer.save_model

    def save_model() -> bool:
        with WRITE_LOCK:
            exact = None if trainer.stop or trainer.epoch + 1 >= trainer.epochs else state()
            if exact is None:
                done = original()
            else:
                with carried_in_metrics(trainer, {STATE_KEY: exact}):
                    done = original()
            saved()
            return done

    trainer.save_model = save_model


def _unwrap(model: Any) -> Any:
    return getattr(model, "module", model)  # DDP
