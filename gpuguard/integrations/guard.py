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
- a host-memory copy of the training state at optimizer-step boundaries
  (hostcopy.py) and a writer thread (rescue.py) that saves it every
  `save_every_s` and, when the checkpoint signal finds the trainer stuck in
  a call that never returns (a GPU gone mid-CUDA-call), writes it and exits
  75 for it;
- checkpoints that carry the exact training state and random states
  (exact.py, rng.py), so a resumed run continues the same run.

A mid-epoch checkpoint is saved as "epochs completed = the one before", plus
where in the interrupted epoch it stopped (replay.py): the resumed run trains
the rest of that epoch in the same order and nothing twice, so at most the
batch in flight when the request came is lost. Gradients accumulated since the
last optimizer step travel in the checkpoint, so no trained batch is dropped
and the optimizer steps where the uninterrupted run would. A stuck trainer
loses the batches since the newest host copy (at most `every` optimizer
steps). best.pt is never overwritten with half-trained weights. Where the
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
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpuguard.contract import EX_TEMPFAIL
from gpuguard.integrations.atomic import temp_path, write_bytes_atomic
from gpuguard.integrations.exact import live_state, restore_pending, restore_training_state, wrap_save_model
from gpuguard.integrations.hostcopy import BUDGET, HostCopy
from gpuguard.integrations.replay import Position, ReplaySampler, install
from gpuguard.integrations.saving import AtomicPath, load_training_state, make_strip_atomic, save_mid_epoch
from gpuguard.integrations.rescue import RESCUE_SUFFIX, Progress, Rescuer, ema_skeleton, exit_now
from gpuguard.integrations.steps import StepClock


log = logging.getLogger("gpuguard.yolo")


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
    Only a report: a file that cannot be read or rewritten (a full disk) is left as
    it is, and the training goes on.
    """
    try:
        if not csv.exists():
            return 0
        header, *rows = csv.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True) or [""]
        keep = [row for row in rows if _row_epoch(row) <= completed_epochs]
        if len(keep) != len(rows):
            write_bytes_atomic(csv, "".join([header, *keep]).encode())
    except OSError as exc:
        log.warning("results.csv rows of epochs trained again stay in %s: %s", csv, exc)
        return 0
    return len(rows) - len(keep)


def _row_epoch(row: str) -> float:
    try:
        return float(row.split(",", 1)[0])
    except ValueError:
        return -math.inf  # not a data row: keep it


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
        self.resume_state: dict[str, Any] | None = None  # that checkpoint's exact state (exact.py), if it has one
        self._pending: dict[str, Any] | None = None  # its random states and gradients: back at the first batch
        self._inexact = False  # a mid-epoch save whose position cannot be replayed: no exact state in it
        self._skip_pending = 0  # batches the first epoch of this process leaves out
        self._clock = StepClock()
        self._progress = Progress()
        self._hostcopy: HostCopy | None = None  # with the writer thread: where the order is replayable
        self._rescuer: Rescuer | None = None
        self.save_every_s: float | None = 0.0  # periodic checkpoints; None: adaptive (rescue.py); 0: none
        self.copy_budget = BUDGET  # the host copy's share of step time
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
        make_strip_atomic()
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
        self._progress.mark()
        if self.heartbeat is not None:
            self.heartbeat.beat()

    # --- callbacks ------------------------------------------------------
    def on_pretrain_routine_start(self, trainer: Any) -> None:
        """save_dir is known: make its checkpoint writes atomic and tell gpuguard where last.pt is."""
        trainer.wdir = AtomicPath(trainer.wdir)
        trainer.last = AtomicPath(trainer.last)
        trainer.best = AtomicPath(trainer.best)
        for path in (trainer.last, trainer.best):
            for suffix in ("", RESCUE_SUFFIX):
                temp_path(path, suffix).unlink(missing_ok=True)  # left by a writer killed mid-save
        last = Path(trainer.last).resolve()
        if self.checkpoint_file is not None:
            write_bytes_atomic(self.checkpoint_file, f"{last}\n".encode())
        log.info("checkpoint: %s", last)
        wrap_save_model(
            trainer, state=lambda: None if self._inexact else live_state(trainer, self._clock.last_opt_ni),
            saved=self._saved_by_trainer,
        )
        self._beat()

    def on_pretrain_routine_end(self, trainer: Any) -> None:
        """The optimizer and loaders exist: restore a first epoch's training state; make the order replayable."""
        if self.first_epoch_state is not None:
            load_training_state(trainer, self.first_epoch_state)
        if self.resume_state is not None:
            restore_training_state(trainer, self.resume_state)
            self._pending = self.resume_state
            self._clock.last_opt_ni, self._clock.enforce = self.resume_state["last_opt_ni"], True  # steps.py
            log.info("resumed with the exact training state (full-precision weights, EMA, optimizer; random states)")
        if is_main_rank():
            self._replay = install(trainer)
            self._loader = trainer.train_loader
        if self._replay is not None:
            self._hostcopy = HostCopy(self.copy_budget)
            self._rescuer = Rescuer(
                self._hostcopy, checkpoint_signal=self.checkpoint_signal, target=Path(trainer.last),
                checkpoint_file=self.checkpoint_file, save_every_s=self.save_every_s, progress=self._progress,
                skeleton=ema_skeleton(trainer), results=trainer.read_results_csv,
            )  # fmt: skip
            self._rescuer.start()
        step, replay, clock, hostcopy = trainer.optimizer_step, self._replay, self._clock, self._hostcopy

        def optimizer_step() -> None:
            if clock.enforce and not clock.due(trainer):
                return  # a resumed process's own cadence starts afresh: the interrupted run's counts
            clock.fix_warmup(trainer)
            with hostcopy.stepping() if hostcopy is not None else nullcontext():
                step()
            clock.stepped(trainer)
            if replay is not None and trainer.train_loader is self._loader:
                replay.stepped()
                if hostcopy is not None:  # not at an epoch's last batch: the epoch-end save follows
                    hostcopy.after_step(trainer, lambda: self._meta(trainer), allowed=not clock.last_batch())

        trainer.optimizer_step = optimizer_step  # where the host copy and periodic checkpoints stand

    def on_train_start(self, trainer: Any) -> None:
        """After a resume: forget results rows of epochs trained again; skip what the epoch already trained."""
        if trainer.resume:
            dropped = trim_results(trainer.csv, trainer.start_epoch)
            if dropped:
                log.info("dropped %d results.csv row(s) past epoch %d: that work is redone", dropped, trainer.start_epoch)
        log.info("training epochs %d..%d of %d", trainer.start_epoch + 1, trainer.epochs, trainer.epochs)
        self._progress.restart()  # set-up pauses are no measure of how long a batch may take
        self._clock.start(trainer)
        if self.resume_position is not None:
            self._skip_trained(trainer, self.resume_position)  # after _do_train sized the epoch: it stays whole
        self._beat()

    def _skip_trained(self, trainer: Any, pos: Position) -> None:
        replay = self._replay
        same = replay is not None and (replay.samples, replay.batch_size, replay.batches(), replay.seed, replay.order) == (
            pos.samples, pos.batch_size, pos.batches, pos.seed, pos.order,
        )
        if replay is None or not same:
            self._clock.enforce = False  # the epoch is redone from its start: no cadence to continue
            log.warning(
                "epoch %d was checkpointed at batch %d/%d, but this run's data order differs "
                "(%s): the whole epoch is trained again",
                trainer.start_epoch + 1, pos.done, pos.batches,
                "no replay" if replay is None else f"{replay.samples} samples, batch {replay.batch_size}, seed {replay.seed}",
            )
            return
        replay.resume_at(pos)
        self._skip_pending = pos.done
        log.info(
            "epoch %d resumes at batch %d/%d in the interrupted run's order: batches 1-%d were trained before "
            "the checkpoint and are not repeated",
            trainer.start_epoch + 1, pos.done + 1, pos.batches, pos.done,
        )

    def on_train_batch_start(self, trainer: Any) -> None:
        self._clock.batch_start()
        if trainer.train_loader is not self._loader:
            self._clock.enforce = False  # rebuilt after an out-of-memory retry: its cadence starts afresh
        self._beat()
        if self._replay is not None and trainer.train_loader is self._loader:
            self._replay.consumed()

    def on_train_epoch_start(self, trainer: Any) -> None:
        """The first batch is fetched next: the last moment to put the interrupted run's random states back."""
        self._batch = 0
        self._clock.epoch_start(self._skip_pending)
        if self._hostcopy is not None:
            self._hostcopy.new_epoch()
        self._skip_pending = 0
        if self._pending is not None:
            missed = restore_pending(trainer, self._pending)
            if missed:
                log.warning("random states not restored (%s): the run may differ from an uninterrupted one", ", ".join(missed))
            self._pending = None
        self._beat()

    def on_train_batch_end(self, trainer: Any) -> None:
        self._batch += 1
        self._beat()
        if not is_main_rank():
            return
        if self._clock.enforce and self._clock.due(trainer) and not self._clock.stepped_now:
            trainer.optimizer_step()  # the interrupted run stepped here; this process's trainer did not
        if not self.requested:
            return
        if self._hostcopy is None or self._position(trainer) is None:
            if self._rescuer is not None:
                self._rescuer.stand_down()
            self._checkpoint_mid_epoch(trainer)
        elif not self._clock.last_batch():  # at the last, the epoch-end save answers (on_model_save)
            self._answer_from_host_copy(trainer)

    def on_val_batch_end(self, validator: Any) -> None:
        self._beat()  # validation of a large set can outlast the hang timeout

    def on_model_save(self, trainer: Any) -> None:
        """A request that arrived during validation: the epoch's checkpoint was just written."""
        if self.requested and is_main_rank() and trainer.epoch + 1 < trainer.epochs:
            log.info(
                "checkpoint at the end of epoch %d/%d: resume will start at epoch %d (%s)",
                trainer.epoch + 1, trainer.epochs, trainer.epoch + 2, trainer.last,
            )
            exit_now(EX_TEMPFAIL)

    def on_fit_epoch_end(self, trainer: Any) -> None:
        self._beat()
        copy = self._hostcopy
        if copy is not None and copy.copies:
            log.info(
                "host copy: every %d optimizer step(s), %.1f ms a copy, %.1f ms a step (budget %g%%), "
                "%.2f ms a mark between copies; %d periodic checkpoint(s) written",
                copy.every, copy.cost_s * 1e3, copy.step_s * 1e3, copy.budget * 100, copy.mark_s * 1e3,
                self._rescuer.periodic,
            )

    def _checkpoint_mid_epoch(self, trainer: Any) -> None:
        """No replayable position (no replay, or a loader rebuilt after an out-of-memory retry): save
        as if the previous epoch had just ended, so the resume redoes this one; keep best.pt; exit 75."""
        self._inexact = True  # the epoch is redone: nothing to continue exactly
        save_mid_epoch(trainer)
        sys.stderr.write("\n")  # end the progress bar's line
        log.info(
            "checkpoint at epoch %d/%d batch %d/%d: resume will redo epoch %d (%s)",
            trainer.epoch + 1, trainer.epochs, self._batch, len(trainer.train_loader), trainer.epoch + 1, trainer.last,
        )
        exit_now(EX_TEMPFAIL)

    def _answer_from_host_copy(self, trainer: Any) -> None:
        """Copy the state as it stands at this batch end, accumulated gradients included; the writer
        thread writes it; exit 75. When the copy or its write fails (host memory short, a full disk),
        Ultralytics' own save answers instead, as for a trainer without a host copy."""
        snap = self._hostcopy.take(trainer, self._meta(trainer, at_step=False), wait=True, grads=True)
        if snap is None or not self._rescuer.hand_over(snap):
            log.warning("the host copy could not answer the checkpoint request: saving the Ultralytics way")
            self._rescuer.stand_down()
            self._checkpoint_mid_epoch(trainer)
        sys.stderr.write("\n")  # end the progress bar's line
        pos = snap.meta["position"]
        log.info(
            "checkpoint at epoch %d/%d batch %d/%d: resume will train the epoch's other %d batches (%s)",
            trainer.epoch + 1, trainer.epochs, pos["done"], pos["batches"], pos["batches"] - pos["done"], trainer.last,
        )
        exit_now(EX_TEMPFAIL)

    def _meta(self, trainer: Any, at_step: bool = True) -> dict[str, Any]:
        """What a checkpoint holds beside the tensors, as of the last optimizer step (or this batch end)."""
        from ultralytics import __version__

        stopper, replay = trainer.stopper, self._replay
        return {
            "epoch": trainer.epoch, "position": (replay.position_at_step() if at_step else replay.position()).to_json(),
            "last_opt_ni": self._clock.last_opt_ni,
            "metrics": dict(trainer.metrics), "best_fitness": trainer.best_fitness,
            "stopper": {"best_fitness": stopper.best_fitness, "best_epoch": stopper.best_epoch},
            "train_args": dict(vars(trainer.args)), "version": __version__,
        }  # fmt: skip

    def _saved_by_trainer(self) -> None:
        if self._rescuer is not None and self._hostcopy is not None:
            self._rescuer.saved_by_trainer(self._hostcopy.steps)

    def _position(self, trainer: Any) -> Position | None:
        return self._replay.position() if self._replay is not None and trainer.train_loader is self._loader else None
