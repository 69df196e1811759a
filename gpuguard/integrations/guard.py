"""gpuguard's hooks into an Ultralytics trainer, installed as callbacks.

What they add to a stock `yolo train`:
- checkpoint on request: the checkpoint signal only sets a flag; the next
  batch end saves a resumable checkpoint and exits 75 (EX_TEMPFAIL), so
  gpuguard restarts the job elsewhere. The process never reaches
  `final_eval`, which would strip `last.pt` and make it non-resumable.
- a heartbeat file touched at most once a second, so hang detection sees
  progress;
- atomic `last.pt`/`best.pt` writes (Ultralytics writes them in place);
- the checkpoint's path, told to gpuguard through GPUGUARD_CHECKPOINT_FILE;
- periodic mid-epoch checkpoints (`save_every_s`), for the faults a trainer
  cannot answer: a GPU gone in the middle of a CUDA call leaves the process
  hung or dead, and then only a checkpoint already on disk counts.

A mid-epoch checkpoint is saved as "epochs completed = the one before", plus
where in the interrupted epoch it stopped (replay.py): the resumed run trains
the rest of that epoch in the same order and nothing twice, so at most the
batch in flight when the request came is lost. Gradients accumulated since the
last optimizer step are applied first, in one smaller step, so no trained batch
is dropped. best.pt is never overwritten with half-trained weights. Where the
order cannot be replayed (DDP, a loader rebuilt after an out-of-memory retry),
the resume redoes the interrupted epoch in full, and says so.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpuguard.contract import EX_TEMPFAIL
from gpuguard.integrations.atomic import replacing, temp_path, write_bytes_atomic
from gpuguard.integrations.replay import RESUME_KEY, Position, ReplaySampler, install


log = logging.getLogger("gpuguard.yolo")


class _AtomicPath(type(Path())):  # type: ignore[misc]
    """A checkpoint path whose write_bytes replaces the file atomically.

    Ultralytics calls `self.last.write_bytes(...)`; swapping the trainer's
    path objects for these makes every checkpoint write crash-safe without
    copying its save_model. Paths derived with `/` keep the class, so
    `wdir / "epoch3.pt"` is covered too.
    """

    def write_bytes(self, data: Any) -> int:
        write_bytes_atomic(Path(self), data)
        return len(data)


class _DiscardPath(type(Path())):  # type: ignore[misc]
    """Stands in for best.pt during a mid-epoch save: the write goes nowhere."""

    def write_bytes(self, data: Any) -> int:
        return len(data)


def is_main_rank() -> bool:
    """Rank 0 (or no DDP): the only process that saves and exits 75."""
    return all(int(os.environ.get(var, "-1")) in (-1, 0) for var in ("RANK", "LOCAL_RANK"))


def parse_signal(name: str) -> signal.Signals:
    """'SIGUSR1', 'USR1' or '10' -> signal.SIGUSR1."""
    text = name.strip().upper()
    try:
        if text.isdigit():
            return signal.Signals(int(text))
        return signal.Signals[text if text.startswith("SIG") else f"SIG{text}"]
    except (KeyError, ValueError):
        raise ValueError(f"unknown signal {name!r}") from None


@dataclass
class Heartbeat:
    """Touches a file at most every `interval_s` seconds."""

    path: Path
    interval_s: float = 1.0
    _last: float = field(default=-math.inf, init=False)
    _failed: bool = field(default=False, init=False)

    def beat(self) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return
        self._last = now
        try:
            self.path.touch()
        except OSError as exc:  # a missing heartbeat must not stop training
            if not self._failed:
                log.warning("cannot touch heartbeat %s: %s", self.path, exc)
            self._failed = True


def trim_results(csv: Path, completed_epochs: int) -> int:
    """Drop results.csv rows of epochs a resume will train again; return how many.

    A kill between writing an epoch's row and saving its checkpoint leaves a
    row for an epoch the resumed run repeats; without this it would appear twice.
    """
    if not csv.exists():
        return 0
    header, *rows = csv.read_text(encoding="utf-8").splitlines(keepends=True) or [""]
    keep = [row for row in rows if _row_epoch(row) <= completed_epochs]
    if len(keep) != len(rows):
        write_bytes_atomic(csv, "".join([header, *keep]).encode())
    return len(rows) - len(keep)


def _row_epoch(row: str) -> float:
    try:
        return float(row.split(",", 1)[0])
    except ValueError:
        return -math.inf  # not a data row: keep it


def exit_now(code: int) -> None:
    """Flush what was logged, then leave without running Ultralytics' teardown."""
    for handler in [*logging.getLogger().handlers, *log.handlers]:
        handler.flush()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


class TrainerGuard:
    """The callbacks for one training process; see the module docstring."""

    def __init__(
        self,
        *,
        checkpoint_signal: signal.Signals = signal.SIGUSR1,
        heartbeat: Heartbeat | None = None,
        checkpoint_file: Path | None = None,
    ) -> None:
        self.checkpoint_signal = checkpoint_signal
        self.heartbeat = heartbeat
        self.checkpoint_file = checkpoint_file
        # set by gpuguard-yolo once it has read its arguments and the checkpoint it resumes
        self.resume_position: Position | None = None  # where in its epoch that checkpoint stood
        self.first_epoch_state: Path | None = None  # a first epoch's checkpoint, whose training state to load
        self.save_every_s = 0.0  # periodic mid-epoch checkpoints; 0: only on request and at epoch ends
        self._last_save = time.monotonic()
        self._saved_at: Position | None = None  # the last periodic checkpoint's position
        self.requested = False
        self._batch = 0
        self._replay: ReplaySampler | None = None
        self._loader: Any = None  # the loader the replay sampler sits in

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> TrainerGuard:
        """Configure from the variables gpuguard gives a managed job."""
        heartbeat = env.get("GPUGUARD_HEARTBEAT")
        checkpoint_file = env.get("GPUGUARD_CHECKPOINT_FILE")
        return cls(
            checkpoint_signal=parse_signal(env.get("GPUGUARD_CHECKPOINT_SIGNAL") or "SIGUSR1"),
            heartbeat=Heartbeat(Path(heartbeat)) if heartbeat else None,
            checkpoint_file=Path(checkpoint_file) if checkpoint_file else None,
        )

    def listen(self) -> None:
        """Catch the checkpoint signal from now on (its default action would kill the process)."""
        signal.signal(self.checkpoint_signal, self._on_signal)

    def install(self, model: Any) -> None:
        """Hook into `model` (an ultralytics Model) before `model.train()`."""
        _make_strip_atomic()
        for event in (
            "on_pretrain_routine_start",
            "on_pretrain_routine_end",
            "on_train_start",
            "on_train_epoch_start",
            "on_train_batch_start",
            "on_train_batch_end",
            "on_val_batch_end",
            "on_model_save",
            "on_fit_epoch_end",
        ):
            model.add_callback(event, getattr(self, event))

    def _on_signal(self, signum: int, frame: object) -> None:
        self.requested = True  # acted on at the next batch end, where a save is consistent

    def _beat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.beat()

    # --- callbacks ------------------------------------------------------
    def on_pretrain_routine_start(self, trainer: Any) -> None:
        """save_dir is known: make its checkpoint writes atomic and tell gpuguard where last.pt is."""
        trainer.wdir = _AtomicPath(trainer.wdir)
        trainer.last = _AtomicPath(trainer.last)
        trainer.best = _AtomicPath(trainer.best)
        for path in (trainer.last, trainer.best):
            temp_path(path).unlink(missing_ok=True)  # left by a writer killed mid-save
        last = Path(trainer.last).resolve()
        if self.checkpoint_file is not None:
            write_bytes_atomic(self.checkpoint_file, f"{last}\n".encode())
        log.info("checkpoint: %s", last)
        self._beat()

    def on_pretrain_routine_end(self, trainer: Any) -> None:
        """The optimizer and loaders exist: restore a first epoch's training state; make the order replayable."""
        if self.first_epoch_state is not None:
            _load_training_state(trainer, self.first_epoch_state)
        if is_main_rank():
            self._replay = install(trainer)
            self._loader = trainer.train_loader
            if self._replay is not None:
                step, replay = trainer.optimizer_step, self._replay

                def optimizer_step() -> None:
                    step()
                    if trainer.train_loader is self._loader:
                        replay.stepped()

                trainer.optimizer_step = optimizer_step  # where a periodic checkpoint may stand

    def on_train_start(self, trainer: Any) -> None:
        """After a resume: forget results rows of epochs trained again; skip what the epoch already trained."""
        if trainer.resume:
            dropped = trim_results(trainer.csv, trainer.start_epoch)
            if dropped:
                log.info("dropped %d results.csv row(s) past epoch %d: that work is redone", dropped, trainer.start_epoch)
        log.info("training epochs %d..%d of %d", trainer.start_epoch + 1, trainer.epochs, trainer.epochs)
        self._last_save = time.monotonic()
        if self.resume_position is not None:
            self._skip_trained(trainer, self.resume_position)  # after _do_train sized the epoch: it stays whole
        self._beat()

    def _skip_trained(self, trainer: Any, pos: Position) -> None:
        replay = self._replay
        same = replay is not None and (replay.samples, replay.batch_size, replay.batches(), replay.seed, replay.order) == (
            pos.samples, pos.batch_size, pos.batches, pos.seed, pos.order,
        )
        if replay is None or not same:
            log.warning(
                "epoch %d was checkpointed at batch %d/%d, but this run's data order differs "
                "(%s): the whole epoch is trained again",
                trainer.start_epoch + 1, pos.done, pos.batches,
                "no replay" if replay is None else f"{replay.samples} samples, batch {replay.batch_size}, seed {replay.seed}",
            )
            return
        replay.resume_at(pos)
        log.info(
            "epoch %d resumes at batch %d/%d in the interrupted run's order: batches 1-%d were trained before "
            "the checkpoint and are not repeated",
            trainer.start_epoch + 1, pos.done + 1, pos.batches, pos.done,
        )

    def on_train_batch_start(self, trainer: Any) -> None:
        if self._replay is not None and trainer.train_loader is self._loader:
            self._replay.consumed()

    def on_train_epoch_start(self, trainer: Any) -> None:
        self._batch = 0
        self._beat()

    def on_train_batch_end(self, trainer: Any) -> None:
        self._batch += 1
        self._beat()
        if not is_main_rank():
            return
        if self.requested:
            self._checkpoint_mid_epoch(trainer)
        elif self.save_every_s > 0 and time.monotonic() - self._last_save >= self.save_every_s:
            self._periodic_checkpoint(trainer)

    def on_val_batch_end(self, validator: Any) -> None:
        self._beat()  # validation of a large set can outlast the hang timeout

    def on_model_save(self, trainer: Any) -> None:
        """A request that arrived during validation: the epoch's checkpoint was just written."""
        self._last_save = time.monotonic()
        if self.requested and is_main_rank() and trainer.epoch + 1 < trainer.epochs:
            log.info(
                "checkpoint at the end of epoch %d/%d: resume will start at epoch %d (%s)",
                trainer.epoch + 1, trainer.epochs, trainer.epoch + 2, trainer.last,
            )
            exit_now(EX_TEMPFAIL)

    def on_fit_epoch_end(self, trainer: Any) -> None:
        self._beat()

    def _checkpoint_mid_epoch(self, trainer: Any) -> None:
        """Save as if the previous epoch had just ended, plus where this one stopped; keep best.pt; exit 75."""
        pos = self._position(trainer)
        if pos is not None:
            _apply_pending_gradients(trainer)
        _save_mid_epoch(trainer, pos)
        sys.stderr.write("\n")  # end the progress bar's line
        if pos is not None:
            log.info(
                "checkpoint at epoch %d/%d batch %d/%d: resume will train the epoch's other %d batches (%s)",
                trainer.epoch + 1, trainer.epochs, pos.done, pos.batches, pos.batches - pos.done, trainer.last,
            )
        else:
            log.info(
                "checkpoint at epoch %d/%d batch %d/%d: resume will redo epoch %d (%s)",
                trainer.epoch + 1, trainer.epochs, self._batch, len(trainer.train_loader), trainer.epoch + 1, trainer.last,
            )
        exit_now(EX_TEMPFAIL)

    def _periodic_checkpoint(self, trainer: Any) -> None:
        """Bound what a fault the trainer cannot answer (a GPU gone mid-call, a SIGKILL) loses.

        The checkpoint stands where the last optimizer step left the weights:
        batches after it are in no weights yet, so the resume trains them
        (again); training itself goes on exactly as without the save. Taken
        only where the position can be replayed, so nothing is trained twice
        that the checkpoint already holds.
        """
        if self._batch >= len(trainer.train_loader):
            return  # the epoch's last batch: Ultralytics' own epoch-end save comes next
        now, pos = self._position(trainer), self._replay.position_at_step() if self._replay is not None else None
        if now is None or pos is None or pos.label != now.label or pos == self._saved_at:
            return  # no optimizer step in this epoch yet (its start is the epoch-end checkpoint), or none since
        _save_mid_epoch(trainer, pos)
        self._last_save, self._saved_at = time.monotonic(), pos
        log.info(
            "periodic checkpoint at epoch %d/%d batch %d/%d (every %gs): %s",
            trainer.epoch + 1, trainer.epochs, pos.done, pos.batches, self.save_every_s, trainer.last,
        )

    def _position(self, trainer: Any) -> Position | None:
        return self._replay.position() if self._replay is not None and trainer.train_loader is self._loader else None


def _load_training_state(trainer: Any, path: Path) -> None:
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


def _save_mid_epoch(trainer: Any, pos: Position | None) -> None:
    """last.pt as "the previous epoch completed" (+ where this one stands); best.pt and epochN.pt untouched."""
    epoch, best, period, metrics = trainer.epoch, trainer.best, trainer.save_period, trainer.metrics
    trainer.epoch, trainer.best, trainer.save_period = epoch - 1, _DiscardPath(best), 0
    if pos is not None:
        trainer.metrics = {**metrics, RESUME_KEY: pos.to_json()}  # save_model keeps it as train_metrics
    try:
        trainer.save_model()
    finally:
        trainer.epoch, trainer.best, trainer.save_period, trainer.metrics = epoch, best, period, metrics


def _pending_gradients(trainer: Any) -> bool:
    """Has backward() run since the last optimizer step? (the step zeroes .grad; it may keep the tensors)"""
    return any(p.grad is not None and bool(p.grad.any()) for p in trainer.model.parameters())


def _apply_pending_gradients(trainer: Any) -> None:
    """Gradients of batches since the last optimizer step are not in a checkpoint: step on them now.

    Only when there are some: a step on zero gradients would still move the
    weights (momentum, weight decay)."""
    if _pending_gradients(trainer):
        trainer.optimizer_step()


def _make_strip_atomic() -> None:
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
