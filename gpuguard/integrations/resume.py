"""What a checkpoint handed over in GPUGUARD_RESUME_FROM says about the run.

Ultralytics' own resume goes wrong in two ways this module exists to catch:
a finished checkpoint (stripped by final_eval: epoch -1, no optimizer) makes
it silently start a NEW run, and a checkpoint taken during the first epoch
(saved by gpuguard as "no epoch completed", epoch -1 with an optimizer) is
refused by its resume check.

Ultralytics then unpickles the same checkpoint three more times on its way
to the first batch (the model, the trainer's resume check, its resume): on a
resumed attempt's critical path, the largest part of its start-up after the
set-up a warm standby did ahead. `SharedLoad` serves it the one dict loaded
here instead, while the file is the one loaded, until training starts.
"""

from __future__ import annotations

import os
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
    loaded: dict[str, Any] | None = field(default=None, repr=False, compare=False)  # the checkpoint as loaded
    identity: tuple[int, ...] = ()  # the file's, as it was loaded (identity_of)


def read_resume_point(path: Path) -> ResumePoint:
    """Load the checkpoint (on the CPU) and classify it; raises if it cannot be loaded."""
    import torch

    path = path.resolve()
    identity = identity_of(path)  # before the load: a file replaced while it loads is not the one loaded
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
        loaded=None if finished else ckpt,
        identity=identity,
    )


def identity_of(path: Path) -> tuple[int, ...]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class SharedLoad:
    """Ultralytics' checkpoint loads of `point`'s file answered with the dict already loaded; see the
    module docstring. A load of anything else, a changed file or a weights-only load goes to disk."""

    def __init__(self, point: ResumePoint) -> None:
        from ultralytics.nn import tasks

        self.served = 0
        self._point: ResumePoint | None = point
        self._tasks, self._real = tasks, tasks.torch_load
        tasks.torch_load = self._load

    def _load(self, file: Any, *args: Any, **kwargs: Any) -> Any:
        point = self._point
        if point is not None and point.loaded is not None and kwargs.get("weights_only") is not True:
            try:
                same = Path(file).resolve() == point.path and identity_of(point.path) == point.identity
            except (OSError, TypeError):
                same = False
            if same:
                self.served += 1
                return point.loaded
        return self._real(file, *args, **kwargs)

    def close(self) -> None:
        """Training starts: from here on the file is the trainer's to rewrite."""
        self._tasks.torch_load = self._real
        self._point = None
