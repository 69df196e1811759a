"""Capture and restore every random-number state a training step draws from.

A resumed run only repeats the interrupted one if the augmentations (mosaic
and friends draw from Python's `random`, HSV from NumPy's global state), the
model (torch's CPU and CUDA generators) and the loader (its own
`torch.Generator`) continue from where they stood, not from the seeds set
at start-up. With `workers=0` every draw happens in the training process, so
this is all of them; loader worker processes keep their own states, which a
checkpoint cannot reach (they prefetch ahead of the trainer).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

KEY = "rng"  # in gpuguard's exact-state payload


def capture(trainer: Any) -> dict[str, Any]:
    """The states as they stand now, as plain picklable objects (tensors on the CPU)."""
    import torch

    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    generator = _loader_generator(trainer)
    if generator is not None:
        state["loader"] = generator.get_state()
    return state


def restore(state: dict[str, Any], trainer: Any) -> list[str]:
    """Put the states back; return the names of those that could not be (logged by the caller)."""
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    missed = []
    if "cuda" in state:
        if torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            missed.append("cuda")
    generator = _loader_generator(trainer)
    if "loader" in state and generator is not None:
        generator.set_state(state["loader"])
    elif "loader" in state:
        missed.append("loader")
    if getattr(getattr(trainer, "train_loader", None), "num_workers", 0):
        missed.append("loader workers")
    return missed


def _loader_generator(trainer: Any) -> Any:
    return getattr(getattr(trainer, "train_loader", None), "generator", None)
