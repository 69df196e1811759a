"""What a checkpoint handed over in GPUGUARD_RESUME_FROM says about the run.

Ultralytics' own resume goes wrong in two ways this module exists to catch:
a finished checkpoint (stripped by final_eval: epoch -1, no optimizer) makes
it silently start a NEW run, and a checkpoint taken during the first epoch
(saved by gpuguard as "no epoch completed", epoch -1 with an optimizer) is
refused by its resume check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpuguard.integrations.exact import read_state
from gpuguard.integrations.replay import RESUME_KEY, Position


@dataclass(frozen=True, slots=True)
class ResumePoint:
    path: Path  # absolute
    completed_epochs: int  # epochs fully trained; the resumed run starts with the next one (0-based index)
    epochs: int  # epochs the run was asked for
    finished: bool  # nothing left to train: exit 0 instead of resuming
    save_dir: Path | None  # where the original run writes (results.csv, weights/); None once finished
    train_args: dict[str, Any]
    position: Position | None = None  # where in the next epoch a mid-epoch checkpoint stopped
    state: dict[str, Any] | None = field(default=None, repr=False)  # the exact training state (exact.py)


def read_resume_point(path: Path) -> ResumePoint:
    """Load the checkpoint (on the CPU) and classify it; raises if it cannot be loaded."""
    import torch

    path = path.resolve()
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "train_args" not in ckpt:
        raise ValueError(f"{path} is not an Ultralytics training checkpoint")
    train_args = dict(ckpt["train_args"])
    epochs = int(train_args.get("epochs") or 0)
    completed = int(ckpt.get("epoch", -1)) + 1
    stripped = ckpt.get("optimizer") is None
    finished = stripped or completed >= epochs
    save_dir = train_args.get("save_dir")  # final_eval strips it; only needed to continue
    if not save_dir and not finished:
        raise ValueError(f"{path} does not say which run directory it belongs to (train_args.save_dir)")
    return ResumePoint(
        path=path,
        completed_epochs=epochs if stripped else completed,
        epochs=epochs,
        finished=finished,
        save_dir=Path(save_dir).resolve() if save_dir else None,
        train_args=train_args,
        position=None if finished else Position.from_json((ckpt.get("train_metrics") or {}).get(RESUME_KEY)),
        state=None if finished else read_state(ckpt),
    )
