"""What a host copy reads of a trainer: its tensors by name, and the small state a step changes.

For hostcopy.py's copies and marks: everything a checkpoint needs, read without packing the whole
optimizer state or deep-copying what needs no copy (a mark reads the small state at every step).
"""

from __future__ import annotations

import copy
from typing import Any

from gpuguard.integrations import rng
from gpuguard.integrations.exact import pending_grads

ATOMIC = {int, float, bool, str, type(None)}  # hyperparameters that need no deep copy (a mark takes them every step)


def sources(trainer: Any, grads: bool) -> tuple[list[tuple[str, Any, bool]], dict[int, dict[str, Any]]]:
    """(name, live tensor, written by the forward pass?) for everything a checkpoint needs, and
    the optimizer's non-tensor per-parameter values."""
    model = getattr(trainer.model, "module", trainer.model)
    buffers = {name for name, _ in model.named_buffers()}
    pairs = [(f"model/{k}", v, k in buffers) for k, v in model.state_dict().items()]
    if grads:
        pairs += [(f"grad/{k}", v, False) for k, v in pending_grads(trainer).items()]
    pairs += [(f"ema/{k}", v, False) for k, v in trainer.ema.ema.state_dict().items()]
    scalars: dict[int, dict[str, Any]] = {}
    for index, values in trainer.optimizer.state_dict()["state"].items():
        for name, value in values.items():
            if hasattr(value, "shape"):
                pairs.append((f"optim/{index}/{name}", value, False))
            else:
                scalars.setdefault(index, {})[name] = value
    return pairs, scalars


def small_state(trainer: Any) -> dict[str, Any]:
    """What a step changes beside the big tensors: random states, learning rates, EMA count, scaler."""
    return {
        rng.KEY: rng.capture(trainer), "param_groups": param_groups(trainer.optimizer),
        "updates": int(trainer.ema.updates), "scaler": trainer.scaler.state_dict(),
    }  # fmt: skip


def param_groups(optimizer: Any) -> list[dict[str, Any]]:
    """`optimizer.state_dict()["param_groups"]`, copied, without packing the whole optimizer state."""
    index: dict[int, int] = {}
    groups = []
    for group in optimizer.param_groups:
        packed = {k: v if type(v) in ATOMIC else copy.deepcopy(v) for k, v in group.items() if k != "params"}
        packed["params"] = [index.setdefault(id(p), len(index)) for p in group["params"]]
        groups.append(packed)
    return groups
