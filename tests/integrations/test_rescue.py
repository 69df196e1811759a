"""The writer thread in a real process whose main thread is stuck in a blocking call.

The child trains a small model a few steps (with a host copy at every step,
or with copies so rare under a tiny budget that only the first three steps
have one), then either blocks its main thread in `time.sleep` (a C call that releases
the GIL, as a call into a GPU that is gone does: the Python signal handler
never gets to act) or answers the checkpoint signal at its next "batch end".
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import wait_until
from gpuguard import contract
from gpuguard.fault import FaultNote
from gpuguard.integrations.exact import read_state

EX_TEMPFAIL = 75

CHILD = """
import copy, logging, os, signal, sys, time
from pathlib import Path
import torch
from gpuguard.integrations.hostcopy import HostCopy
from gpuguard.integrations.rescue import Progress, Rescuer, exit_now

out, mode, steps, budget = Path(sys.argv[1]), sys.argv[2], int(sys.argv[4]), float(sys.argv[5])
logging.basicConfig(level=logging.INFO)
if "FULL_DISK_WRITES" in os.environ:  # the writer's first N checkpoint writes meet a full disk half-way
    import errno
    real_save, full = torch.save, [int(os.environ["FULL_DISK_WRITES"])]
    def save(obj, f, *args, **kwargs):
        if full[0] > 0 and str(f).endswith(".partial"):
            full[0] -= 1
            Path(f).write_bytes(b"PK\x03\x04" + bytes(4096))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
class Trainer:
    device, train_loader = torch.device("cpu"), None
    def __init__(self):
        self.model, self.optimizer = model, torch.optim.AdamW(model.parameters(), lr=0.01)
        self.ema = type("Ema", (), {"ema": copy.deepcopy(model), "updates": 0})()
        self.scaler = torch.amp.GradScaler("cuda", enabled=False)
trainer, copier, progress, requested = Trainer(), HostCopy(budget=budget), Progress(), []
signal.signal(signal.SIGUSR1, lambda *_: requested.append(1))
rescuer = Rescuer(copier, checkpoint_signal=signal.SIGUSR1, target=out / "last.pt",
                  checkpoint_file=out / "checkpoint-path", save_every_s=float(sys.argv[3]), progress=progress,
                  skeleton=copy.deepcopy(trainer.ema.ema), results=lambda: None)
rescuer.start()
meta = {"epoch": 1, "last_opt_ni": 0, "metrics": {}, "best_fitness": None, "stopper": {}, "train_args": {}, "version": "test"}
def step(n):
    trainer.model(torch.randn(4, 3, 8, 8)).square().mean().backward()
    with copier.stepping():
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        trainer.ema.updates += 1
    copier.after_step(trainer, lambda: {**meta, "position": {"done": n, "batches": 9}})
    progress.mark()
    torch.save({"model": model.state_dict(), "optimizer": trainer.optimizer.state_dict()}, out / f"at-step-{n}.pt")
for n in range(1, steps + 1):
    step(n)
progress.longest = max(progress.longest, float(os.environ.get("LONGEST", "0")))  # a slow trainer's bound
(out / "ready").touch()
if mode == "stuck":
    trainer.model(torch.randn(4, 3, 8, 8))  # the next batch's forward: BatchNorm statistics move on
    while True:
        time.sleep(3600)
if mode == "stuck-in-step":
    with copier.stepping():
        next(iter(model.parameters())).data.add_(1.0)  # half a step written...
        while True:
            time.sleep(3600)  # ...and stuck there
while not requested:  # an answering trainer: busy with its batch until the handler has run
    time.sleep(0.01)
step(steps + 1)
snap = copier.take(trainer, {**meta, "position": {"done": steps + 1, "batches": 9}}, wait=True)
exit_now(75 if rescuer.hand_over(snap) else 3)
"""


_CHILDREN: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _no_child_left() -> Iterator[None]:
    """A stuck child outlives a failed wait forever: each test's are killed when it ends."""
    yield
    while _CHILDREN:
        child = _CHILDREN.pop()
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)


def start(
    tmp_path: Path, mode: str, save_every_s: float = 0, steps: int = 3, budget: float = float("inf"), **env: str
) -> subprocess.Popen[str]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    log = (tmp_path / "child.log").open("w")
    argv = [sys.executable, str(script), str(tmp_path), mode, str(save_every_s), str(steps), str(budget)]
    _CHILDREN.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True, env={**os.environ, **env}))
    return _CHILDREN[-1]


def ready(tmp_path: Path, proc: subprocess.Popen[str]) -> None:
    wait_until(lambda: (tmp_path / "ready").exists() or proc.poll() is not None, 60, "the child's last step")
    assert proc.poll() is None, (tmp_path / "child.log").read_text()


def exact_matches(checkpoint: Path, expected: Path) -> bool:
    import torch

    state = read_state(torch.load(checkpoint, map_location="cpu", weights_only=False))
    want = torch.load(expected, map_location="cpu", weights_only=False)
    return (
        state is not None and _equal(state["model"], want["model"])
        and _equal(state["optimizer"]["state"], want["optimizer"]["state"])
    )  # fmt: skip


def _equal(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.slow
def test_a_stuck_main_thread_is_rescued_with_the_copy_of_its_last_step(tmp_path: Path) -> None:
    proc = start(tmp_path, "stuck")
    ready(tmp_path, proc)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == EX_TEMPFAIL
    log = (tmp_path / "child.log").read_text()
    assert "main thread stuck" in log and "checkpoint at epoch 2 batch 3/9 from the host copy" in log, log
    assert exact_matches(tmp_path / "last.pt", tmp_path / "at-step-3.pt")  # not the moved-on live statistics
    assert Path((tmp_path / "checkpoint-path").read_text().strip()) == (tmp_path / "last.pt").resolve()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "step", "source"),
    [
        # copies at steps 1-3 only: step 5's weights and optimizer state come from the live tensors, its
        # BatchNorm statistics from its mark (the stuck forward moved the live ones on)
        ("stuck", 5, "the live state"),
        # stuck inside the step itself (the step lock held): the live tensors may be half-written, so the
        # rescue writes the host copy of step 3, never a torn live copy
        ("stuck-in-step", 3, "the host copy"),
    ],
)
def test_a_stuck_trainer_between_copies_is_rescued_with_its_last_whole_step(
    tmp_path: Path, mode: str, step: int, source: str
) -> None:
    proc = start(tmp_path, mode, steps=5, budget=1e-9)
    ready(tmp_path, proc)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == EX_TEMPFAIL
    log = (tmp_path / "child.log").read_text()
    assert f"checkpoint at epoch 2 batch {step}/9 from {source}" in log, log
    assert exact_matches(tmp_path / "last.pt", tmp_path / f"at-step-{step}.pt")


@pytest.mark.slow
def test_an_answering_trainer_hands_its_own_fresh_copy_to_the_writer(tmp_path: Path) -> None:
    proc = start(tmp_path, "answer")
    ready(tmp_path, proc)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == EX_TEMPFAIL
    assert "stuck" not in (tmp_path / "child.log").read_text()
    assert exact_matches(tmp_path / "last.pt", tmp_path / "at-step-4.pt")


@pytest.mark.slow
def test_periodic_checkpoints_are_written_while_the_main_thread_is_stuck(tmp_path: Path) -> None:
    """No signal at all (the SIGKILL/SIGSTOP domain): what is on disk is what counts."""
    proc = start(tmp_path, "stuck", save_every_s=0.05)
    ready(tmp_path, proc)
    wait_until(lambda: "periodic checkpoint at epoch 2 batch 3/9" in (tmp_path / "child.log").read_text(), 60, "the periodic save")
    proc.kill()
    proc.wait(timeout=30)
    assert exact_matches(tmp_path / "last.pt", tmp_path / "at-step-3.pt")


def noted(tmp_path: Path, gpu_lost: bool, attempt: int = 1) -> dict[str, str]:
    """The child's environment with gpuguard's fault note written for attempt 1."""
    path = tmp_path / "fault"
    path.write_bytes(FaultNote(attempt, "GPU is lost: reboot the node", "GPU-a", gpu_lost).encode())
    return {contract.ENV_FAULT_FILE: str(path), contract.ENV_ATTEMPT: "1", "LONGEST": "1000"}


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "step", "source"), [("stuck", 5, "the live state"), ("stuck-in-step", 3, "the host copy")])
def test_a_trainer_whose_gpu_is_gone_is_rescued_without_waiting(tmp_path: Path, mode: str, step: int, source: str) -> None:
    """Its longest pause so far (1000 s) would make the rescue wait 3000 s to call it stuck: the
    note that its GPU is gone makes it rescue at once, with the same state as a stuck trainer's."""
    proc = start(tmp_path, mode, steps=5, budget=1e-9, **noted(tmp_path, gpu_lost=True))
    ready(tmp_path, proc)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == EX_TEMPFAIL
    log = (tmp_path / "child.log").read_text()
    assert "GPU GPU-a is gone (GPU is lost: reboot the node)" in log, log
    assert f"checkpoint at epoch 2 batch {step}/9 from {source}" in log, log
    assert exact_matches(tmp_path / "last.pt", tmp_path / f"at-step-{step}.pt")


@pytest.mark.slow
@pytest.mark.parametrize(("gpu_lost", "attempt"), [(False, 1), (True, 2)])
def test_a_trainer_whose_gpu_still_runs_is_waited_for(tmp_path: Path, gpu_lost: bool, attempt: int) -> None:
    """A note that does not say the GPU is gone (or is another attempt's) changes nothing: the
    trainer answers with its own next step."""
    proc = start(tmp_path, "answer", **noted(tmp_path, gpu_lost, attempt))
    ready(tmp_path, proc)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == EX_TEMPFAIL
    assert "is gone" not in (tmp_path / "child.log").read_text()
    assert exact_matches(tmp_path / "last.pt", tmp_path / "at-step-4.pt")


def no_partial_left(tmp_path: Path) -> bool:
    return not list(tmp_path.glob(".*.partial"))


@pytest.mark.slow
def test_a_periodic_save_on_a_full_disk_is_tried_again_and_the_writer_lives_on(tmp_path: Path) -> None:
    """The first write meets a full disk: no partial file is left to keep it full, the next interval
    writes, and the writer still answers the checkpoint request after that."""
    proc = start(tmp_path, "answer", save_every_s=0.2, FULL_DISK_WRITES="1")
    ready(tmp_path, proc)
    wait_until(lambda: "periodic checkpoint at epoch 2 batch 3/9" in (tmp_path / "child.log").read_text(), 60, "a periodic save")
    log = (tmp_path / "child.log").read_text()
    assert "periodic checkpoint not written to" in log and "No space left on device" in log, log
    assert no_partial_left(tmp_path) and exact_matches(tmp_path / "last.pt", tmp_path / "at-step-3.pt")
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == EX_TEMPFAIL
    assert exact_matches(tmp_path / "last.pt", tmp_path / "at-step-4.pt")


@pytest.mark.slow
def test_an_answer_the_disk_cannot_take_returns_to_the_trainer(tmp_path: Path) -> None:
    """hand_over says the write failed (the trainer then saves another way) instead of waiting forever."""
    proc = start(tmp_path, "answer", FULL_DISK_WRITES="100")
    ready(tmp_path, proc)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == 3, (tmp_path / "child.log").read_text()
    assert "the trainer's checkpoint not written to" in (tmp_path / "child.log").read_text()
    assert no_partial_left(tmp_path) and not (tmp_path / "last.pt").exists()


@pytest.mark.slow
def test_a_rescue_the_disk_cannot_take_tells_gpuguard_nothing(tmp_path: Path) -> None:
    """A stuck trainer whose rescue cannot be written: no checkpoint-path file for gpuguard to trust,
    no partial file, no retry loop refilling the disk; the process is left for gpuguard to stop."""
    proc = start(tmp_path, "stuck", FULL_DISK_WRITES="100")
    ready(tmp_path, proc)
    proc.send_signal(signal.SIGUSR1)
    wait_until(lambda: "the rescue checkpoint not written to" in (tmp_path / "child.log").read_text(), 60, "the failed rescue")
    time.sleep(1.0)  # room for a retry loop to show itself (the request loop polls every 50 ms)
    assert proc.poll() is None  # still stuck: gpuguard stops it after its grace
    assert not (tmp_path / "checkpoint-path").exists() and no_partial_left(tmp_path)
    assert (tmp_path / "child.log").read_text().count("not written to") == 1


@pytest.mark.slow
def test_a_rescue_whose_checkpoint_path_file_cannot_be_rewritten_still_leaves_with_its_checkpoint(tmp_path: Path) -> None:
    """That file was written at the training's start with the same path: the checkpoint on disk is what counts."""
    (tmp_path / "checkpoint-path").mkdir()  # in the file's way
    proc = start(tmp_path, "stuck")
    ready(tmp_path, proc)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == EX_TEMPFAIL, (tmp_path / "child.log").read_text()
    assert "could not rewrite" in (tmp_path / "child.log").read_text()
    assert exact_matches(tmp_path / "last.pt", tmp_path / "at-step-3.pt") and no_partial_left(tmp_path)
