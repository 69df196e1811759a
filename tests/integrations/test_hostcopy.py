"""The host copy on a small real model: consistent copies at step boundaries, the budget, the checkpoint it makes.

Plus the periodic checkpoint's domain, on a real tiny YOLO run: a trainer that
can run nothing more (here: its main thread blocked, then SIGKILL; the same
holds under SIGSTOP) resumes from the newest copy the writer thread put on disk.
"""

from __future__ import annotations

import copy
import io
import math
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from harness import wait_until
from gpuguard.integrations.exact import STATE_KEY, read_state, restore_pending, restore_training_state
from gpuguard.integrations import hostcopy
from gpuguard.integrations.hostcopy import AFTERMATH, SMOOTHING, HostCopy
from gpuguard.integrations.replay import RESUME_KEY
from gpuguard.integrations.rescue import checkpoint
from .yolo_runs import EX_TEMPFAIL, EXACT_ARGS, EXACT_FLAGS, EXACT_SHIM, Job, result_epochs, trained_per_epoch

torch = pytest.importorskip("torch")


@dataclass
class Ema:
    ema: Any
    updates: int = 0


@dataclass
class Trainer:
    """The trainer attributes the host copy reads: a small conv net with BatchNorm, AdamW and an EMA."""

    model: Any = field(default_factory=lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)))
    device: Any = field(default_factory=lambda: torch.device("cpu"))
    train_loader: Any = None
    ema: Ema = field(init=False)
    optimizer: Any = field(init=False)
    scaler: Any = field(default_factory=lambda: torch.amp.GradScaler("cuda", enabled=False))

    def __post_init__(self) -> None:
        self.ema = Ema(copy.deepcopy(self.model))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.01)

    def batch(self) -> None:
        """Forward (BatchNorm statistics move) and backward."""
        self.model(torch.randn(4, 3, 8, 8)).square().mean().backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()
        with torch.no_grad():
            for e, m in zip(self.ema.ema.state_dict().values(), self.model.state_dict().values()):
                e.copy_(0.9 * e + 0.1 * m) if e.is_floating_point() else e.copy_(m)
        self.ema.updates += 1

    def state(self) -> dict[str, Any]:
        return copy.deepcopy({"model": self.model.state_dict(), "ema": self.ema.ema.state_dict(),
                              "optimizer": self.optimizer.state_dict()})  # fmt: skip


META = {"epoch": 1, "position": {"done": 2}, "last_opt_ni": 7, "metrics": {}, "best_fitness": None, "stopper": {},
        "train_args": {"epochs": 3}, "version": "test"}  # fmt: skip


def equal(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_a_copy_taken_at_a_step_is_that_step_s_state_while_the_next_batch_runs() -> None:
    """On the copier thread, as on a GPU (on the CPU copies are made on the trainer's thread)."""
    t, copier = Trainer(), HostCopy(budget=math.inf, background=True)
    for _ in range(3):  # warm: both slots in use
        t.batch()
        with copier.stepping():
            t.step()
        copier.after_step(t, lambda: dict(META))
    at_step = t.state()
    t.batch()  # runs while the copier copies: BatchNorm statistics change, the copy keeps the step's
    snap = copier.hold_latest(timeout=60)
    state = snap.exact_state()
    assert equal(state["model"], at_step["model"]) and equal(state["ema"], at_step["ema"]) and snap.step == 3
    assert equal(state["optimizer"]["state"], at_step["optimizer"]["state"]) and state["grads"] == {}
    assert not equal(state["model"], t.model.state_dict())  # the live running statistics moved on
    copier.release()


def test_between_copies_the_live_state_of_the_last_step_is_copied_and_never_a_stale_or_torn_one() -> None:
    t, copier = Trainer(), HostCopy(budget=0.02)
    copier.every = 1_000_000  # no copies: every step leaves a mark
    assert copier.live(timeout=1) is None  # nothing stepped yet
    for _ in range(2):
        t.batch()
        with copier.stepping():
            t.step()
        copier.after_step(t, lambda: dict(META))
    at_step, draws = t.state(), torch.rand(3)
    t.batch()  # the stuck batch's forward moved the live BatchNorm statistics on
    snap = copier.live(timeout=5)
    assert snap is not None and snap.meta["live"] and snap.step == 2 and snap.complete.is_set()
    state = snap.exact_state()
    assert equal(state["model"], at_step["model"]) and equal(state["ema"], at_step["ema"])
    assert equal(state["optimizer"]["state"], at_step["optimizer"]["state"]) and state["grads"] == {}
    fresh = Trainer()
    restore_training_state(fresh, state)
    assert restore_pending(fresh, state) == [] and torch.equal(torch.rand(3), draws)  # the step's random states

    with copier.stepping():
        t.step()
    assert copier.live(timeout=1) is None  # a step with no mark since (its after_step not run): stale
    copier.after_step(t, lambda: dict(META), allowed=False)  # an epoch's last batch: the epoch-end save answers
    assert copier.live(timeout=1) is None

    copier.after_step(t, lambda: dict(META))
    found: list[Any] = []
    inside = threading.Thread(target=lambda: found.append(copier.live(timeout=30)))
    with copier.stepping():  # the trainer is inside a step: live waits, then gives up
        assert copier.live(timeout=0.2) is None
        inside.start()
        inside.join(0.2)
        assert inside.is_alive()  # waits for the step...
    inside.join(30)
    assert not inside.is_alive() and found == [None]  # ...and then finds its mark stale


def test_the_budget_spaces_copies_by_measured_cost_over_step_time() -> None:
    t, copier = Trainer(), HostCopy(budget=0.02)
    copier.step_s = 0.5
    first = copier.take(t, dict(META), wait=True)
    assert first.meta["fresh"] and copier.cost_s == 0 and copier.every == 1  # new buffers: page faults, not counted
    copier.take(t, dict(META), wait=True)  # the second slot, new too
    timed = copier.take(t, dict(META), wait=True)
    assert timed.meta["timed"] and copier.cost_s == timed.meta["trainer_s"] > 0  # made on the trainer's thread
    again = copier.take(t, dict(META), wait=True)  # every CPU copy is a sample
    assert again.meta["timed"]
    assert copier.cost_s == pytest.approx((1 - SMOOTHING) * timed.meta["trainer_s"] + SMOOTHING * again.meta["trainer_s"])
    timed.meta.update(trainer_s=0.03)  # a sample that costs 30 ms a copy
    copier.cost_s = 0
    copier._account(timed, wait_s=0.0)
    assert copier.every == math.ceil(0.03 / (0.02 * 0.5))
    copier.mark_s = 0.004  # a mark on every step between copies: copies get the rest of the budget
    copier._account(timed, wait_s=0.0)
    assert copier.every == math.ceil(copier.cost_s / (0.02 * 0.5 - 0.004))
    copier.mark_s = 0.05  # marks alone over the budget: copies still get half of it
    copier._account(timed, wait_s=0.0)
    assert copier.every == math.ceil(copier.cost_s / (0.02 * 0.5 / 2))
    copier.mark_s = 0
    timed.meta.update(timed=False, on_gpu=True, trainer_s=0.001)
    copier.cost_s = 0
    copier._account(timed, wait_s=0.002)  # a GPU copy: the trainer thread's share and its wait at the next step
    assert copier.every == 1 and copier.cost_s == 0.003


def test_a_copy_costs_what_its_interval_took_over_a_plain_step_within_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cold cache a copy leaves is part of its cost; a stall in the same interval is not."""
    now = [0.0]
    monkeypatch.setattr(hostcopy, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    t, copier = Trainer(), HostCopy(budget=0.02)
    copier.mark_s = 0.001

    def interval_after_a_copy(own_s: float, interval_s: float) -> None:
        copier._last_step_at, copier._copied, copier._sample = now[0], True, own_s
        now[0] += interval_s
        copier.after_step(t, lambda: dict(META), allowed=False)

    copier.step_s, copier.every = 0, 1
    interval_after_a_copy(0.010, 0.11)  # copies at every step so far (the first ones): the step is the rest
    assert copier.step_s == pytest.approx(0.1) and copier.cost_s == pytest.approx(0.010) and copier.every == 10
    copier.cost_s = 0
    interval_after_a_copy(0.010, 0.115)  # 15 ms over a plain step, whose 1 ms mark this one did not make
    assert copier.cost_s == pytest.approx(0.016) and copier.step_s == 0.1  # no plain step's sample
    assert copier.every == math.ceil(0.016 / (0.02 * 0.1 - 0.001))
    interval_after_a_copy(0.010, 0.6)  # a stall: counted up to AFTERMATH times the copy's own time
    assert copier.cost_s == pytest.approx((1 - SMOOTHING) * 0.016 + SMOOTHING * AFTERMATH * 0.010)
    copier.cost_s = 0
    interval_after_a_copy(0.010, 0.09)  # a quick step after it: never under what the trainer's thread spent
    assert copier.cost_s == pytest.approx(0.010)
    copier.new_epoch()
    copier._copied, copier._sample, copier.cost_s = True, 0.012, 0
    copier.after_step(t, lambda: dict(META), allowed=False)  # no interval (an epoch's first step): its own time
    assert copier.cost_s == pytest.approx(0.012) and copier._sample is None and not copier._copied


def test_a_background_copy_on_the_cpu_is_no_cost_sample() -> None:
    """Beside training on the same cores its own duration says little: it neither sets nor moves the spacing."""
    t, copier = Trainer(), HostCopy(budget=0.02, background=True)
    copier.step_s = 0.5
    for _ in range(4):
        snap = copier.take(t, dict(META), wait=True)
        assert snap.complete.is_set() and not snap.meta["timed"]
    assert copier.cost_s == 0 and copier.every == 1 and copier.copies == 4


def step_and_copy(t: Trainer, copier: HostCopy) -> None:
    t.batch()
    with copier.stepping():
        t.step()
    copier.after_step(t, lambda: dict(META))


def test_a_copy_that_cannot_get_host_memory_turns_copies_off_and_training_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Host memory short (or pinned memory refused): the trainer never sees the error; the newest
    complete copy stays for a rescue, the rest is let go, and nothing is tried again."""
    t, copier = Trainer(), HostCopy(budget=math.inf)
    step_and_copy(t, copier)
    first = copier.hold_latest(timeout=5)
    copier.release()
    assert first is not None and first.step == 1 and copier.off is None
    allocations: list[Any] = []

    def short(src: Any) -> Any:
        allocations.append(src)
        raise MemoryError("cannot allocate 12 MB")

    monkeypatch.setattr(hostcopy, "host_like", short)
    step_and_copy(t, copier)  # the second slot needs new host buffers: refused
    assert copier.off is not None and "MemoryError" in copier.off and len(allocations) == 1
    assert copier.hold_latest(timeout=5) is first  # kept for a rescue
    copier.release()
    assert [s for s in copier._slots if s is not None] == [first]  # the other slot let go
    for _ in range(3):
        step_and_copy(t, copier)  # training goes on: no copy, no mark, nothing allocated again
    assert len(allocations) == 1 and copier.steps == 5 and copier.live(timeout=1) is None
    assert copier.take(t, dict(META), wait=True) is None


def test_a_copy_that_fails_on_the_copier_thread_never_holds_up_the_next_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the copier copies beside the next batch, and the next step waits for it: a copy that
    raises (a device error) must still let that step go, and is never published as the newest."""
    t, copier = Trainer(), HostCopy(budget=math.inf, background=True)
    step_and_copy(t, copier)
    copier.before_step()
    first = copier.hold_latest(timeout=5)
    copier.release()

    def broken(copies: Any, event: Any, stream: Any) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(hostcopy, "copy_all", broken)
    step_and_copy(t, copier)  # handed to the copier, which fails
    stepped = threading.Thread(target=lambda: (copier.before_step(), t.step()))
    stepped.start()
    stepped.join(30)
    assert not stepped.is_alive()  # not left waiting for a copy that never completes
    assert copier.off is not None and "illegal memory access" in copier.off
    assert copier.hold_latest(timeout=5) is first
    copier.release()
    assert copier.take(t, dict(META), wait=True) is None  # the answer then saves the Ultralytics way


def test_the_checkpoint_from_a_copy_restores_the_exact_state_random_states_and_gradients() -> None:
    t, copier = Trainer(), HostCopy()
    t.batch()
    t.step()
    t.batch()  # accumulated, not stepped yet: a copy between steps carries the gradients
    snap = copier.take(t, dict(META), wait=True, grads=True)
    expected, grads, draws = t.state(), {n: p.grad.clone() for n, p in t.model.named_parameters()}, torch.rand(3)
    buffer = io.BytesIO()
    torch.save(checkpoint(snap, copy.deepcopy(t.ema.ema), None), buffer)
    ckpt = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert ckpt["epoch"] == 0 and ckpt["train_metrics"][RESUME_KEY] == {"done": 2}
    assert equal(ckpt["ema"].state_dict(), expected["ema"])  # what Ultralytics' own resume loads...
    state = read_state(ckpt)
    assert state is ckpt["train_metrics"][STATE_KEY] and state["model"]["0.weight"].dtype == torch.float32  # ...and the exact
    fresh = Trainer()
    restore_training_state(fresh, state)
    assert restore_pending(fresh, state) == []
    assert equal(fresh.state(), expected) and fresh.ema.updates == 1 and state["last_opt_ni"] == 7
    assert equal({n: p.grad for n, p in fresh.model.named_parameters()}, grads)
    assert torch.equal(torch.rand(3), draws)


@pytest.mark.e2e
@pytest.mark.slow
def test_a_trainer_that_cannot_run_resumes_from_the_writer_thread_s_newest_copy(
    tmp_path: Path, data_yaml: Path, base_env: dict[str, str]
) -> None:
    """Main thread blocked at epoch 2 batch 3 with no signal: the writer still saves the copy of batch 2; SIGKILL."""
    job = Job(tmp_path, data_yaml, base_env)
    shim = tmp_path / "shim.py"
    shim.write_text(EXACT_SHIM)
    trained = {"TRAINED_LOG": str(tmp_path / "trained.jsonl")}
    flags = ("--save-every-s", "0.05", "--copy-budget", "inf")
    proc = job.start(1, script=shim, flags=flags, extra_args=EXACT_ARGS, BLOCK_AT="2:3", **trained)
    log = Path(job.logs[-1])
    wait_until(lambda: "periodic checkpoint at epoch 2 batch 2/4" in log.read_text(errors="replace"), 120,
               "the writer's checkpoint of the last step before the block")  # fmt: skip
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    rc, log2 = job.finish(job.start(2, resume_from=job.last, script=shim, extra_args=EXACT_ARGS, **trained))
    assert rc == 0, log2
    assert "epoch 2 resumes at batch 3/4 in the interrupted run's order" in log2
    batches, per_epoch = trained_per_epoch(tmp_path / "trained.jsonl")
    images = sorted(p.name for p in (data_yaml.parent / "images" / "train").iterdir())
    assert batches == 8 and {e: sorted(n) for e, n in per_epoch.items()} == {0: images, 1: images}


def test_the_marks_learning_rates_are_the_optimizer_s_own_state_dict_entries() -> None:
    from gpuguard.integrations.trainstate import param_groups

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    decay, no_decay = [model[0].weight], [model[0].bias, *model[1].parameters()]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}], lr=0.01)
    opt.param_groups[0]["lr"] = 0.003  # warm-up moves it every batch
    groups = param_groups(opt)
    assert groups == opt.state_dict()["param_groups"]
    opt.param_groups[0]["lr"] = 0.5
    assert groups[0]["lr"] == 0.003  # a copy, not the live dict


@pytest.mark.e2e
@pytest.mark.slow
def test_a_trainer_whose_host_copy_gets_no_memory_trains_on_and_answers_the_ultralytics_way(
    tmp_path: Path, data_yaml: Path, base_env: dict[str, str]
) -> None:
    """No host buffer can be had: training goes on without copies, and the checkpoint request is answered
    by Ultralytics' own save (the epoch is redone), not by a crash."""
    job = Job(tmp_path, data_yaml, base_env)
    shim = tmp_path / "shim.py"
    shim.write_text(EXACT_SHIM)
    proc = job.start(1, script=shim, flags=EXACT_FLAGS, extra_args=EXACT_ARGS, HOST_MEMORY_SHORT="1", SIGNAL_AT="2:3")
    rc, log = job.finish(proc)
    assert rc == EX_TEMPFAIL, log
    assert "host copy off after host memory short (test)" in log and "saving the Ultralytics way" in log, log
    assert "checkpoint at epoch 2/2 batch 3/4: resume will redo epoch 2" in log, log
    rc, log2 = job.finish(job.start(2, resume_from=job.last, script=shim, extra_args=EXACT_ARGS))
    assert rc == 0, log2
    assert result_epochs(job.save_dir) == [1, 2]
