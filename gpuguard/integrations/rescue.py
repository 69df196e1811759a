"""The checkpoint writer thread: periodic saves from the host copy, and the rescue of a stuck trainer.

A Python signal handler runs only in the main thread, between bytecodes: a
trainer stuck inside a CUDA call on a GPU that is gone never runs it. The
writer thread therefore learns of the checkpoint signal from the C level:
`signal.set_wakeup_fd` makes the interpreter's own C handler write the signal
number into a pipe, in whatever thread the signal lands. On the signal it
reads gpuguard's fault note (gpuguard/fault.py): when the trainer's GPU is
gone, nothing the trainer does on it can finish, so it rescues at once, as
below. Otherwise it waits for the trainer to answer (at its next batch end the trainer takes a
fresh host copy and hands it over through the same pipe); if the trainer
shows no progress (no callback) for `bound_s`, it writes the state of the
trainer's last optimizer step itself (copied from the live tensors when the
trainer is stuck outside a step, hostcopy.py `live`; else the newest host
copy), tells gpuguard and leaves with `os._exit(75)`: the stuck thread can
be neither joined nor unwound.

Every write goes through this one thread (or holds the same lock, for
Ultralytics' own epoch-end saves), and a copy older than the checkpoint on
disk is never written over it. A write that fails (a full disk) leaves the
checkpoint on disk as it was and this thread alive: a periodic save is tried
again at the next interval, a hand-over returns False to the trainer, and a
rescue that cannot write tells gpuguard nothing (it resumes from the newest
checkpoint it holds once it has stopped the trainer).
"""

from __future__ import annotations

import copy
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from gpuguard import fault
from gpuguard.contract import EX_TEMPFAIL
from gpuguard.integrations.atomic import replacing, write_bytes_atomic
from gpuguard.integrations.exact import STATE_KEY
from gpuguard.integrations.hostcopy import HostCopy, Snapshot
from gpuguard.integrations.replay import RESUME_KEY
from gpuguard.integrations.saving import WRITE_LOCK

log = logging.getLogger("gpuguard.yolo")

RESCUE_SUFFIX = ".rescue"  # its temp file, when the trainer is stuck holding the write lock
HANDOFF = 0  # a pipe byte no signal has: the trainer handed over a snapshot to write
RESCUE_MIN_S = 2.0  # never call the trainer stuck sooner than this...
RESCUE_FACTOR = 3.0  # ...or than this many times the longest pause between its callbacks so far
GONE_LOCK_S = 0.25  # GPU gone: how long a trainer inside a step (or a copy in flight) is waited for
# The default periodic interval adapts to what a write costs: the writer thread busy at most
# SAVE_SHARE of the time, but never more often than SAVE_MIN_S nor less than SAVE_MAX_S.
SAVE_SHARE, SAVE_MIN_S, SAVE_MAX_S = 0.005, 30.0, 600.0


def exit_now(code: int) -> None:
    """Flush what was logged, then leave without running Ultralytics' teardown (from any thread)."""
    for handler in [*logging.getLogger().handlers, *log.handlers]:
        handler.flush()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


class Progress:
    """When the trainer last ran a callback, and the longest pause between two so far."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.longest = 0.0

    def restart(self) -> None:
        self.last, self.longest = time.monotonic(), 0.0

    def mark(self) -> None:
        now = time.monotonic()
        self.longest = max(self.longest, now - self.last)
        self.last = now

    def bound_s(self) -> float:
        return max(RESCUE_MIN_S, RESCUE_FACTOR * self.longest)


class Rescuer:
    """The writer thread for one training process; see the module docstring."""

    def __init__(
        self,
        hostcopy: HostCopy,
        *,
        checkpoint_signal: signal.Signals,
        target: Path,
        checkpoint_file: Path | None,
        save_every_s: float | None,
        progress: Progress,
        skeleton: Any,
        results: Callable[[], Any],
    ) -> None:
        self.hostcopy = hostcopy
        self.signum = int(checkpoint_signal)
        self.target = target
        self.checkpoint_file = checkpoint_file
        self.save_every_s = save_every_s  # None: adaptive (SAVE_SHARE); 0: no periodic checkpoints
        self.write_s = 0.0  # the last periodic write's duration
        self.progress = progress
        self.skeleton = skeleton  # a CPU copy of the EMA model: the module a checkpoint pickles
        self.results = results  # reads results.csv, as save_model does
        self.written_step = -1  # optimizer steps in the newest checkpoint on disk
        self.periodic = 0  # periodic checkpoints written
        self._last_save = time.monotonic()
        self._handed: Snapshot | None = None
        self._handed_ok = False  # the handed snapshot is on disk
        self._done = threading.Event()
        self._standing_down = False  # the trainer answers without the host copy (saves itself)
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)

    def start(self) -> None:
        """From the main thread (set_wakeup_fd must be called there)."""
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        threading.Thread(target=self._run, name="gpuguard-rescue", daemon=True).start()

    # --- the trainer's thread --------------------------------------------
    def hand_over(self, snap: Snapshot) -> bool:
        """Have `snap` written as the checkpoint; True once it is on disk, False if it could not be written."""
        self._handed = snap
        os.write(self._write, bytes([HANDOFF]))
        self._done.wait()
        return self._handed_ok

    def stand_down(self) -> None:
        """The trainer answers this request itself (no replayable position): do not rescue it."""
        self._standing_down = True

    def saved_by_trainer(self, step: int) -> None:
        """Ultralytics' epoch-end save just wrote last.pt, holding `step` optimizer steps."""
        self.written_step = max(self.written_step, step)
        self._last_save = time.monotonic()

    # --- the writer thread -----------------------------------------------
    def _run(self) -> None:
        while True:
            ready, _, _ = select.select([self._read], [], [], self._until_periodic())
            if not ready:
                self._periodic()
                continue
            for byte in os.read(self._read, 512):
                if byte == self.signum:
                    self._requested()
                elif byte == HANDOFF:
                    self._write_handed()

    def interval_s(self) -> float:
        """Seconds between periodic checkpoints (0: none)."""
        if self.save_every_s is not None:
            return self.save_every_s
        return min(SAVE_MAX_S, max(SAVE_MIN_S, self.write_s / SAVE_SHARE))

    def _until_periodic(self) -> float | None:
        if self.interval_s() <= 0:
            return None
        return max(0.0, self._last_save + self.interval_s() - time.monotonic())

    def _periodic(self) -> None:
        self._last_save = time.monotonic()
        snap = self.hostcopy.hold_latest(timeout=0)
        try:
            started = time.perf_counter()
            with WRITE_LOCK:  # the check inside: an epoch-end save may have just written a newer state
                if snap is None or snap.step <= self.written_step:
                    return
                if not self._write_snapshot(snap, "periodic checkpoint"):
                    return  # tried again at the next interval
            self.periodic += 1
            self.write_s = time.perf_counter() - started
            pos = snap.meta["position"]
            log.info(
                "periodic checkpoint at epoch %d batch %d/%d from the host copy, written in %.2fs (next in %.0fs): %s",
                snap.meta["epoch"] + 1, pos["done"], pos["batches"], self.write_s, self.interval_s(), self.target,
            )
        finally:
            self.hostcopy.release()

    def _requested(self) -> None:
        """Wait for the trainer to answer; write the host copy if it has stopped making progress.

        When gpuguard's fault note says the GPU is gone, the trainer cannot answer: no waiting."""
        note = fault.read()
        if note is not None and note.gpu_lost and self._rescue(f"GPU {note.gpu} is gone ({note.reason})", gone=True):
            return
        while not self._standing_down:
            ready, _, _ = select.select([self._read], [], [], 0.05)
            if ready and HANDOFF in os.read(self._read, 512):
                self._write_handed()
                return
            stalled = time.monotonic() - self.progress.last
            if stalled > self.progress.bound_s() and self._rescue(f"main thread stuck (no progress for {stalled:.1f}s)"):
                return

    def _write_handed(self) -> None:
        snap, self._handed = self._handed, None
        try:
            with WRITE_LOCK:
                self._handed_ok = snap is not None and self._write_snapshot(snap, "the trainer's checkpoint")
        finally:
            self._done.set()  # whatever happened: the trainer waits for it

    def _rescue(self, why: str, gone: bool = False) -> bool:
        """The trainer is stuck (or its GPU `gone`): write its last step's state and leave. False if
        there is none yet. With the GPU gone, a trainer inside a step is not waited for long.

        True without leaving when the write failed: gpuguard, told of no checkpoint, stops the trainer
        after its grace and resumes from the newest one it holds (trying again would only refill the
        disk that could not take it)."""
        bound = self.progress.bound_s()
        snap = self.hostcopy.live(bound, lock_timeout=GONE_LOCK_S if gone else None, gpu_gone=gone)
        snap = snap or self.hostcopy.hold_latest(timeout=GONE_LOCK_S if gone else bound)
        if snap is None:
            return False
        locked = WRITE_LOCK.acquire(timeout=self.progress.bound_s())
        if not locked:
            log.warning("the trainer is stuck while writing a checkpoint: the host copy is written beside it")
        try:
            if snap.step > self.written_step:
                if not self._write_snapshot(snap, "the rescue checkpoint", tmp_suffix=RESCUE_SUFFIX):
                    self.hostcopy.release()  # a trainer that was only slow copies on
                    return True
                pos = snap.meta["position"]
                source = "the live state" if snap.meta.get("live") else "the host copy"
                where = f"epoch {snap.meta['epoch'] + 1} batch {pos['done']}/{pos['batches']} from {source}"
            else:
                where = "the last epoch end, saved by the trainer (newer than the host copy)"
        finally:
            if locked:
                WRITE_LOCK.release()
        if self.checkpoint_file is not None:
            try:  # the same path as written at the training's start (guard.py): that file stands if this fails
                write_bytes_atomic(self.checkpoint_file, f"{self.target.resolve()}\n".encode())
            except OSError as exc:
                log.warning("could not rewrite %s (%s): gpuguard reads the one written at the start", self.checkpoint_file, exc)
        log.info(
            "%s after a checkpoint request: checkpoint at %s (%s); leaving with %d", why, where, self.target, EX_TEMPFAIL
        )
        exit_now(EX_TEMPFAIL)
        return True  # not reached

    def _write_snapshot(self, snap: Snapshot, what: str, tmp_suffix: str = "") -> bool:
        """True once `snap` is the checkpoint on disk; False (logged) when it could not be written: the
        checkpoint on disk is then the one before, whole."""
        import torch

        try:
            with replacing(self.target, tmp_suffix) as tmp:
                torch.save(checkpoint(snap, self.skeleton, self.results()), tmp)
        except Exception as exc:  # a full disk, a quota, an I/O error: never the end of this thread
            log.error("%s not written to %s: %s; the checkpoint there is the one before", what, self.target, exc)
            return False
        self.written_step = max(self.written_step, snap.step)
        return True


def ema_skeleton(trainer: Any) -> Any:
    """A CPU copy of the EMA model for the writer to pickle, without training-only state (the writer
    thread's own: `checkpoint` points its tensors at a host copy's)."""
    module = copy.deepcopy(trainer.ema.ema).cpu().float()
    if hasattr(module, "criterion"):
        module.criterion = None
    return module


def checkpoint(snap: Snapshot, skeleton: Any, results: Any) -> dict[str, Any]:
    """An Ultralytics checkpoint ("the previous epoch completed", plus the position) with the exact state.

    Its `ema` module is the skeleton on the host copy's own fp32 tensors (Ultralytics stores fp16 and
    loads either): torch.save writes each tensor once, however often the dict names it.
    """
    meta, state = snap.meta, snap.exact_state()
    skeleton.load_state_dict(state["ema"], assign=True)
    ckpt = {
        "epoch": meta["epoch"] - 1,
        "best_fitness": meta["best_fitness"],
        "stopper": meta["stopper"],
        "model": None,
        "ema": skeleton,
        "updates": meta["updates"],
        "optimizer": state["optimizer"],
        "scaler": meta["scaler"],
        "train_args": meta["train_args"],
        "train_metrics": {**meta["metrics"], RESUME_KEY: meta["position"], STATE_KEY: state},
        "train_results": results,
        "date": datetime.now().astimezone().isoformat(),
        "version": meta["version"],
    }
    return ckpt
