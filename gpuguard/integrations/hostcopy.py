"""A host-memory copy of the training state, refreshed at optimizer-step boundaries.

What a checkpoint needs changes only in `optimizer_step` (weights, EMA,
optimizer state) and, for the BatchNorm running statistics, in every forward
pass. So right after a step the small, forward-written tensors are cloned on
the trainer's thread (on a GPU: device-side, no host sync) and a copier
thread copies everything into host buffers (pinned on a GPU, on a side
stream) while the next batch's forward and backward run: they only read
those tensors. The next step waits for the copy first (`before_step`), so a
copy is never torn. Two host slots: a checkpoint writer may hold the newest
complete copy while the next one is filled.

Cost budget: copies are taken every `every` optimizer steps so that their
measured cost, with the marks of the steps between them (below), stays within
`budget` of the measured step time. On a GPU the
cost is what the trainer's thread spends: its share of a copy plus its wait
at the next step (the copy engine's time is free). On the CPU every copy
runs on the trainer's thread, and its duration is its cost: a copy on
another thread takes its time from the cores training uses (measured at
about twice its own duration: torch's threads wait for the core it took,
and the trainer for the GIL), so it would cost more than the budget counts.
`background=True` puts CPU copies on the copier thread too: the tests run a
GPU's code path on the CPU with it. Either way a copy leaves an aftermath to
the step after it (a cold cache, a busy memory bus: on the CPU up to as much
again as the copy): the interval that holds a copy is timed against a plain
step's, and what it took over counts too (`_account`).

Between copies, every step leaves a mark (`Mark`): the small state of that
step (random states, learning rates, scaler, position) and clones of the
forward-written tensors, a few kilobytes. The big tensors (weights, EMA,
optimizer state) change only inside a step, so while the trainer's thread
is stuck outside one (in a forward or backward pass, a data fetch, a
collective), they still hold the marked step's values: `live` copies them
from there, holding the step lock so that a trainer that wakes cannot step
under the copy. A trainer stuck inside a step, or a device that no longer
answers the copy within its timeout (a GPU that fell off the bus), leaves
the newest host copy as the rescue's state.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from gpuguard.integrations import rng
from gpuguard.integrations.devices import copy_all, copy_into, host_like, on_gpu, record_event, side_stream
from gpuguard.integrations.exact import VERSION
from gpuguard.integrations.trainstate import small_state, sources

BUDGET = 0.01  # of step time: with the writer's SAVE_SHARE (rescue.py) and what measuring misses, within 2 %
AFTERMATH = 2.0  # a copy's cost counted with its aftermath at most this times its own time: a stall is none of it
SMOOTHING = 0.3  # weight of the newest measurement in the running averages

log = logging.getLogger("gpuguard.yolo")


@dataclass
class Snapshot:
    """One complete copy: host tensors by name plus the small state beside them."""

    tensors: dict[str, Any]  # "model/<key>", "ema/<key>", "optim/<param index>/<name>", "grad/<param>" -> host tensor
    meta: dict[str, Any]  # epoch, position, rng, updates, param_groups, scaler, metrics, ...
    step: int  # optimizer steps this process had taken when it was copied
    complete: threading.Event = field(default_factory=threading.Event)

    def exact_state(self) -> dict[str, Any]:
        """The exact state (exact.py) on the host tensors."""
        meta = self.meta
        return {
            "version": VERSION, "model": self._part("model/"), "ema": self._part("ema/"), "updates": meta["updates"],
            "optimizer": self._optimizer(), "scaler": meta["scaler"], rng.KEY: meta[rng.KEY],
            "grads": self._part("grad/"), "last_opt_ni": meta["last_opt_ni"],
        }  # fmt: skip

    def _part(self, prefix: str) -> dict[str, Any]:
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def _optimizer(self) -> dict[str, Any]:
        state: dict[int, dict[str, Any]] = {}
        for index, values in self.meta["optim_scalars"].items():
            state.setdefault(index, {}).update(values)
        for key, value in self.tensors.items():
            if key.startswith("optim/"):
                _, index, name = key.split("/", 2)
                state.setdefault(int(index), {})[name] = value
        return {"state": state, "param_groups": self.meta["param_groups"]}


@dataclass
class Mark:
    """One optimizer step's small state, for a copy of the live tensors while the trainer is stuck."""

    trainer: Any
    meta: dict[str, Any]  # as a Snapshot's, less optim_scalars (read at the copy: only a step changes them)
    written: dict[str, Any]  # clones of the forward-written tensors (BatchNorm statistics) as the step left them
    step: int  # as Snapshot.step
    stepped: int  # HostCopy._stepped at the mark: a step since makes it stale
    event: Any  # on a GPU: recorded after the step and the clones; the copy waits for it, not for later work


class HostCopy:
    """The newest complete host copy of one trainer's state; see the module docstring."""

    def __init__(self, budget: float = BUDGET, background: bool = False) -> None:
        self.budget = budget
        self.background = background  # CPU copies on the copier thread too (a GPU's always are)
        self.every = 1  # take a copy every this many optimizer steps
        self.step_s = 0.0  # running average of the time between steps
        self.cost_s = 0.0  # running average of one copy's cost
        self.mark_s = 0.0  # running average of one mark's cost (the trainer's thread, every step between copies)
        self.copies = 0
        self.off: str | None = None  # why copies and marks stopped (`_turn_off`)
        self._steps = 0
        self._stepped = 0  # optimizer steps of any loader, counted under the step lock
        self._step_lock = threading.Lock()  # held by the trainer's thread inside a step
        self._mark: Mark | None = None
        # (id of the model, its named buffers, the marks' copies of them: reused, as a mark is stale once the
        # trainer steps again, and no step can start while `live` copies)
        self._buffers: tuple[int, list[tuple[str, Any]], list[Any]] | None = None
        self._last_step_at: float | None = None
        self._copied = False  # a copy taken at the last step: the interval to the next is no plain step
        self._sample: float | None = None  # the newest copy's timed cost, until its interval is in
        self._taken_at_step = -math.inf
        self._slots: list[Snapshot | None] = [None, None]
        self._latest: Snapshot | None = None
        self._held: Snapshot | None = None  # by the checkpoint writer
        self._lock = threading.Lock()
        self._job: tuple[Snapshot, list[tuple[Any, Any]], Any] | None = None
        self._inflight: Snapshot | None = None
        self._stream: Any = None  # the copier's CUDA stream, made on its first GPU copy
        self._wake = threading.Condition(self._lock)
        self._copier = threading.Thread(target=self._copy_loop, name="gpuguard-hostcopy", daemon=True)
        self._copier.start()

    # --- the trainer's thread --------------------------------------------
    def before_step(self) -> None:
        """The step is about to change what the copier reads: let it finish first."""
        snap = self._inflight
        if snap is None:
            return
        started = time.perf_counter()
        snap.complete.wait()
        self._inflight = None
        self._account(snap, wait_s=time.perf_counter() - started)

    @contextmanager
    def stepping(self) -> Iterator[None]:
        """Around the optimizer step (and the EMA and scaler updates it makes): the live tensors change
        only inside, and never under a copy `live` is making."""
        self.before_step()
        with self._step_lock:
            yield
            self._stepped += 1

    @property
    def steps(self) -> int:
        """Optimizer steps counted so far."""
        return self._steps

    def new_epoch(self) -> None:
        """Validation and the epoch-end save since the last step are no part of step time."""
        self._last_step_at = None
        self._buffers = None  # looked up again once an epoch: cheap insurance against a rebuilt model

    def after_step(self, trainer: Any, meta: Callable[[], dict[str, Any]], allowed: bool = True) -> None:
        """Count the step; take a copy if `allowed`, one is due and the budget allows."""
        now = time.perf_counter()
        copied, self._copied = self._copied, False
        if self._last_step_at is not None:
            interval = now - self._last_step_at
            if not copied:
                self.step_s = _average(self.step_s, interval)
            elif self._sample is not None and (self.step_s == 0 or self.every == 1):  # no plain step to measure
                self.step_s = _average(self.step_s, max(interval - self._sample, 0.0))
            elif self._sample is not None and self.step_s > 0:  # the copy's cost with its aftermath: see `_account`
                self._sample = min(AFTERMATH * self._sample, max(self._sample, interval - self.step_s + self.mark_s))
        if self._sample is not None:
            self.cost_s, self._sample = _average(self.cost_s, self._sample), None
            self._respace()
        self._last_step_at = now
        self._steps += 1
        self._mark = None
        if not allowed or self.off:
            return
        try:
            if self._steps - self._taken_at_step >= self.every:
                self._copied = True  # the interval to the next step holds the copy
                if self.take(trainer, meta(), wait=False) is not None or self.off:
                    return
                self._copied = False
            self._leave_mark(trainer, meta)
        except Exception as exc:  # never the end of the training: see `_turn_off`
            self._copied = False
            self._turn_off(exc)

    def _leave_mark(self, trainer: Any, meta: Callable[[], dict[str, Any]]) -> None:
        started = time.perf_counter()
        model = getattr(trainer.model, "module", trainer.model)
        if self._buffers is None or self._buffers[0] != id(model):  # walking the module tree costs more than copying
            named = [(f"model/{name}", buffer) for name, buffer in model.named_buffers()]
            self._buffers = (id(model), named, [buffer.clone() for _, buffer in named])
        _, named, kept = self._buffers
        copy_into(kept, [buffer for _, buffer in named])  # one call, into the same tensors: see `_buffers`
        written = {name: dst for (name, _), dst in zip(named, kept)}
        self._mark = Mark(
            trainer, {**meta(), **small_state(trainer)}, written, self._steps, self._stepped, record_event(trainer)
        )  # fmt: skip
        self.mark_s = _average(self.mark_s, time.perf_counter() - started)
        self._respace()  # the first marks come only once copies are spaced out: count them at once

    def take(self, trainer: Any, meta: dict[str, Any], wait: bool, grads: bool = False) -> Snapshot | None:
        """Start a copy of the state as it stands now; with `wait`, return only once it is complete.

        `grads`: with the gradients accumulated since the last step (a copy between steps).

        Without `wait`, None when the writer holds the one slot that is not the newest copy. None too
        when copies are off, or this one failed (which turns them off)."""
        if self.off:
            return None
        try:
            snap = self._take(trainer, meta, wait, grads)
        except Exception as exc:  # never the end of the training: see `_turn_off`
            self._turn_off(exc)
            return None
        return None if snap is None or (wait and snap.meta.get("failed")) else snap

    def _take(self, trainer: Any, meta: dict[str, Any], wait: bool, grads: bool) -> Snapshot | None:
        self.before_step()
        if self.off:  # the copy in flight failed
            return None
        started = time.perf_counter()
        with self._lock:
            while not (free := self._free_slots()):
                if not wait:
                    return None
                self._wake.wait()
        sync = not (self.background or on_gpu(trainer))  # on the trainer's thread: nothing runs beside the copy
        pairs, scalars = sources(trainer, grads)
        meta = {**meta, **small_state(trainer), "optim_scalars": scalars}
        old = self._slots[free[0]]
        host = old.tensors if old is not None else {}
        copies, fresh = [], False
        for name, src, forward_written in pairs:
            dst = host.get(name)
            if dst is None or dst.shape != src.shape or dst.dtype != src.dtype:
                dst, fresh = host_like(src), True
            copies.append((dst, src.clone() if forward_written and not sync else src))
        snap = Snapshot({name: dst for (name, _, _), (dst, _) in zip(pairs, copies)}, meta, self._steps)
        self._slots[free[0]] = snap
        event = record_event(trainer)  # after the clones: the copier reads them
        snap.meta.update(on_gpu=event is not None, fresh=fresh, timed=False)
        self._taken_at_step = self._steps
        if sync:
            copy_all(copies, None, None)  # on the trainer's thread: its duration is its cost
            snap.meta.update(trainer_s=time.perf_counter() - started, timed=True)
            with self._lock:
                self._latest = snap
            snap.complete.set()
            self._account(snap, wait_s=0.0)
            return snap
        snap.meta["trainer_s"] = time.perf_counter() - started
        with self._lock:
            self._job = (snap, copies, event)
            self._wake.notify_all()
        self._inflight = snap
        if wait:
            self.before_step()
        return snap

    # --- any thread -------------------------------------------------------
    def hold_latest(self, timeout: float) -> Snapshot | None:
        """The newest complete copy, kept from being overwritten until `release`.

        A copy in progress is waited for (up to `timeout`): it is newer, and
        the copier finishes it even while the trainer's thread is stuck."""
        inflight = self._inflight
        if inflight is not None:
            inflight.complete.wait(timeout)
        with self._lock:
            self._held = self._latest
            return self._held

    def live(self, timeout: float, lock_timeout: float | None = None, gpu_gone: bool = False) -> Snapshot | None:
        """For the rescue of a stuck trainer: its state as of its last step, copied from the live tensors.

        None when no mark is newer than the newest copy, when the trainer's thread is inside a step (the
        lock not free within `lock_timeout`, default `timeout`), when the copy does not finish within
        `timeout`, or when the tensors are on a GPU that is gone (nothing can be read from it)."""
        mark = self._mark
        if mark is None or (gpu_gone and mark.event is not None):
            return None
        if not self._step_lock.acquire(timeout=timeout if lock_timeout is None else lock_timeout):
            return None
        try:
            if mark.stepped != self._stepped:
                return None
            copied: list[Snapshot] = []
            worker = threading.Thread(target=_copy_live, args=(mark, copied), name="gpuguard-live-copy", daemon=True)
            worker.start()
            worker.join(timeout)
            return copied[0] if copied else None
        finally:
            self._step_lock.release()

    def release(self) -> None:
        with self._lock:
            self._held = None
            self._wake.notify_all()

    def _free_slots(self) -> list[int]:
        return [i for i, s in enumerate(self._slots) if s is None or (s is not self._latest and s is not self._held)]

    # --- the copier thread ----------------------------------------------
    def _copy_loop(self) -> None:
        while True:
            with self._lock:
                while self._job is None:
                    self._wake.wait()  # shared with `take` waiting for a slot: both re-check their condition
                snap, copies, event = self._job
                self._job = None
            try:
                if event is not None and self._stream is None:
                    import torch

                    self._stream = torch.cuda.Stream()
                copy_all(copies, event, self._stream)
            except Exception as exc:  # the trainer waits for `complete`: it must come, copied or not
                snap.meta["failed"] = True
                self._turn_off(exc)
            else:
                with self._lock:
                    self._latest = snap
            snap.complete.set()

    def _turn_off(self, exc: Exception) -> None:
        """A copy or a mark failed (host memory short, pinned memory refused, a device error): neither is
        tried again, and the training goes on without them. The newest complete copy is kept for a
        rescue; the other slot and the marks' tensors are let go, which may be what the node lacks."""
        if self.off is None:
            log.error(
                "host copy off after %s: training goes on; a stuck trainer is now rescued from the newest "
                "checkpoint or earlier copy only", exc,
            )  # fmt: skip
        self.off = f"{type(exc).__name__}: {exc}"
        self._mark, self._buffers = None, None
        with self._lock:
            self._slots = [s if s is self._latest or s is self._held else None for s in self._slots]

    # --- the trainer's thread again ---------------------------------------
    def _account(self, snap: Snapshot, wait_s: float) -> None:
        """A cost sample from a GPU copy or a CPU copy on the trainer's thread; see the module docstring.

        What the trainer's thread spent on the copy is the least it cost. The copy also leaves a cold
        cache and a busy memory bus for the step after it (measured on the CPU at up to as much again):
        when the copy was taken at a step, `after_step` raises the sample to what the interval holding
        it took over a plain step's, the mark it did not make given back (at most AFTERMATH times the
        copy's own time). Then it counts."""
        self.copies += 1
        if snap.meta["fresh"] or snap.meta.get("failed"):
            return  # new host buffers: page faults paid once, not a measure of the copies to come
        if not (snap.meta["on_gpu"] or snap.meta["timed"]):
            return  # a background copy on the CPU (tests): its own duration says little of its cost
        self._sample = snap.meta["trainer_s"] + wait_s
        if not self._copied:  # taken outside `after_step` (a checkpoint): no interval to wait for
            self.cost_s, self._sample = _average(self.cost_s, self._sample), None
            self._respace()

    def _respace(self) -> None:
        """Copies every `every` steps, from the running averages: at each cost sample and each mark.

        A step without a copy still pays a mark, so copies get what the marks leave of the budget
        (never under half of it: a mark dearer than that is logged beside the budget)."""
        if self.step_s > 0 and self.cost_s > 0:
            spare = max(self.budget * self.step_s - self.mark_s, self.budget * self.step_s / 2)
            self.every = max(1, math.ceil(self.cost_s / spare))


def _copy_live(mark: Mark, out: list[Snapshot]) -> None:
    """The marked step's state onto the host: the live tensors, less the forward-written ones the mark kept."""
    import torch

    try:
        pairs, scalars = sources(mark.trainer, grads=False)
        with torch.no_grad(), side_stream(mark.event):  # on a GPU: not behind a stuck kernel queued since
            tensors = {name: (mark.written[name] if written else src).detach().to("cpu", copy=True)
                       for name, src, written in pairs}  # fmt: skip
    except Exception:  # a device in trouble: the rescue falls back to the newest host copy
        log.exception("copying the live training state failed")
        return
    snap = Snapshot(tensors, {**mark.meta, "optim_scalars": scalars, "live": True}, mark.step)
    snap.complete.set()
    out.append(snap)


def _average(old: float, new: float) -> float:
    return new if old == 0 else (1 - SMOOTHING) * old + SMOOTHING * new
