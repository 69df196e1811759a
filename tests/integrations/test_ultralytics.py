"""gpuguard-yolo against a real (tiny, CPU) YOLO training run in subprocesses.

Signals, exits and kills are real; only the dataset and model are small.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpuguard.integrations.atomic import temp_path, write_bytes_atomic
from gpuguard.integrations.guard import Heartbeat, parse_signal, trim_results
from gpuguard.integrations.resume import ResumePoint
from gpuguard.integrations.ultralytics import UsageError, check_local, resume_kwargs, split_args

from .yolo_runs import EX_TEMPFAIL, Job, result_epochs, SHIM, trained_per_epoch, wait_for



def zip_ok(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return archive.testzip() is None


@dataclass
class SignalledRun:
    job: Job
    outcomes: list[tuple[int, str]]
    heartbeat_mtimes: list[float]
    midway_checkpoints: list[Path]
    best_at_exit: list[bytes | None]  # best.pt after each interrupted attempt


@pytest.fixture(scope="module")
def signalled(tmp_path_factory: pytest.TempPathFactory, data_yaml: Path, base_env: dict[str, str]) -> SignalledRun:
    """A 2-epoch job checkpointed on SIGUSR1 during epoch 1, then during epoch 2, then completed.

    Attempt 1 gets the signal as soon as its heartbeat shows (handler installed, training not
    yet started), so it checkpoints after batch 1 of epoch 1: the first-epoch restart path.
    Attempt 2 sends it to itself as epoch 2 starts: Ultralytics' own resume path.
    """
    job = Job(tmp_path_factory.mktemp("signalled"), data_yaml, base_env)
    shim = job.root / "shim.py"
    shim.write_text(SHIM)
    outcomes, mtimes, checkpoints, best_at_exit = [], [], [], []
    best = job.save_dir / "weights" / "best.pt"

    def ended(attempt: int, proc: subprocess.Popen[str]) -> Path:
        outcomes.append(job.finish(proc))
        mtimes.append(job.heartbeat.stat().st_mtime)
        best_at_exit.append(best.read_bytes() if best.exists() else None)
        # gpuguard validates and resumes from a copy in its snapshot dir, under another name
        snapshot = job.root / f"snapshot-{attempt}.pt"
        snapshot.write_bytes(job.last.read_bytes())
        checkpoints.append(snapshot)
        return snapshot

    trained = {"TRAINED_LOG": str(job.root / "trained.jsonl"), "STATE_LOG": str(job.root / "state.jsonl")}
    proc = job.start(1, script=shim, **trained)
    wait_for(job.heartbeat.exists, proc)
    proc.send_signal(signal.SIGUSR1)
    snapshot = ended(1, proc)
    snapshot = ended(2, job.start(2, resume_from=snapshot, script=shim, SIGNAL_AT_EPOCH="1", **trained))
    outcomes.append(job.finish(job.start(3, resume_from=snapshot, script=shim, **trained)))
    mtimes.append(job.heartbeat.stat().st_mtime)
    return SignalledRun(job, outcomes, mtimes, checkpoints, best_at_exit)


@pytest.mark.e2e
@pytest.mark.slow  # the module's signalled run (its fixture) takes ~25 s alone
def test_checkpoint_signal_exits_75_and_resume_trains_exactly_the_requested_epochs(signalled: SignalledRun) -> None:
    import torch
    from ultralytics import YOLO

    (rc1, log1), (rc2, log2), (rc3, log3) = signalled.outcomes
    assert rc1 == EX_TEMPFAIL, log1
    assert "checkpoint at epoch 1/2 batch 1/4: resume will train the epoch's other 3 batches" in log1
    assert rc2 == EX_TEMPFAIL, log2
    assert "0/2 epochs done, attempt 2" in log2
    assert "epoch 1 resumes at batch 2/4 in the interrupted run's order" in log2
    assert "checkpoint at epoch 2/2 batch 1/4: resume will train the epoch's other 3 batches" in log2
    assert rc3 == 0, log3
    assert "1/2 epochs done, attempt 3" in log3
    assert "epoch 2 resumes at batch 2/4 in the interrupted run's order" in log3
    assert "Final" not in log1 + log2  # neither interrupted attempt reached final_eval
    for checkpoint in signalled.midway_checkpoints:
        assert zip_ok(checkpoint)
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
        assert ckpt["optimizer"] is not None  # resumable, not stripped
    job = signalled.job
    assert result_epochs(job.save_dir) == [1, 2]
    assert not (job.root / "runs" / "job2").exists()  # continued in the original save_dir
    final = torch.load(job.last, map_location="cpu", weights_only=False)
    assert final["epoch"] == -1 and final["optimizer"] is None  # finished properly
    for weights in ("last.pt", "best.pt"):
        assert YOLO(str(job.save_dir / "weights" / weights)).task == "detect"


@pytest.mark.e2e
@pytest.mark.slow  # the module's signalled run (its fixture) takes ~25 s alone
def test_every_epoch_trains_every_image_exactly_once_across_the_interruptions(signalled: SignalledRun) -> None:
    """What the trainer itself was fed: the resumed attempts train the rest of each epoch, nothing twice."""
    batches, per_epoch = trained_per_epoch(signalled.job.root / "trained.jsonl")
    images = sorted(p.name for p in (signalled.job.data_yaml.parent / "images" / "train").iterdir())
    assert len(images) == 32 and batches == 8  # 2 epochs of 4 batches, not one more
    assert {epoch: sorted(names) for epoch, names in per_epoch.items()} == {0: images, 1: images}


@pytest.mark.e2e
def test_save_every_s_refuses_a_negative_interval(tmp_path: Path, data_yaml: Path, base_env: dict[str, str]) -> None:
    job = Job(tmp_path, data_yaml, base_env)
    rc, log = job.finish(job.start(1, flags=("--save-every-s", "-1")))
    assert rc == 2 and "--save-every-s must be 0 (off) or more" in log


@pytest.mark.e2e
@pytest.mark.slow  # the module's signalled run (its fixture) takes ~25 s alone
def test_a_first_epoch_resume_keeps_optimizer_and_ema_state(signalled: SignalledRun) -> None:
    """Attempt 2 continues epoch 1, which Ultralytics cannot "resume": its optimizer and EMA still carry on."""
    states = [json.loads(line) for line in (signalled.job.root / "state.jsonl").read_text().splitlines()]
    (fresh_states, fresh_updates), (states2, updates2), (states3, updates3) = states
    assert (fresh_states, fresh_updates) == (0, 0)
    assert states2 > 0 and updates2 >= 1  # epoch 1 batch 1 was trained and stepped
    assert states3 > 0 and updates3 >= updates2  # the ordinary resume, for comparison (it keeps the run's step cadence: exact.py)
    log2 = signalled.outcomes[1][1]
    assert "first epoch continues with the optimizer, scaler and EMA state of" in log2


@pytest.mark.e2e
@pytest.mark.slow  # the module's signalled run (its fixture) takes ~25 s alone
def test_mid_epoch_checkpoint_leaves_best_pt_alone(signalled: SignalledRun) -> None:
    import torch

    first, second = (torch.load(p, map_location="cpu", weights_only=False) for p in signalled.midway_checkpoints)
    assert first["epoch"] == -1  # no epoch completed: epoch 1 goes on from where it stopped
    assert second["epoch"] == 0  # saved during epoch 2 as "epoch 1 done", plus the position in epoch 2
    for ckpt in (first, second):
        assert ckpt["train_metrics"]["gpuguard_resume"]["done"] == 1
    assert signalled.best_at_exit[0] is None  # nothing is "best" before an epoch was validated
    # epoch 1's save wrote the same bytes to last.pt and best.pt; the mid-epoch save rewrote last.pt only
    assert signalled.best_at_exit[1] is not None
    assert signalled.best_at_exit[1] != signalled.midway_checkpoints[1].read_bytes()


@pytest.mark.e2e
@pytest.mark.slow  # the module's signalled run (its fixture) takes ~25 s alone
def test_finished_checkpoint_exits_0_without_training(signalled: SignalledRun) -> None:
    job = signalled.job
    before = (job.save_dir / "results.csv").read_bytes(), job.last.stat().st_mtime_ns
    rc, log = job.run(4, resume_from=job.last)
    assert rc == 0, log
    assert "training already complete" in log
    assert "Starting training" not in log
    assert ((job.save_dir / "results.csv").read_bytes(), job.last.stat().st_mtime_ns) == before


@pytest.mark.e2e
@pytest.mark.slow  # the module's signalled run (its fixture) takes ~25 s alone
def test_heartbeat_is_touched_by_every_attempt(signalled: SignalledRun) -> None:
    mtimes = signalled.heartbeat_mtimes
    assert mtimes == sorted(mtimes) and mtimes[0] < mtimes[-1]


@pytest.mark.e2e
@pytest.mark.slow  # the module's signalled run (its fixture) takes ~25 s alone
def test_checkpoint_file_names_the_absolute_last_pt(signalled: SignalledRun) -> None:
    text = signalled.job.checkpoint_file.read_text().strip()
    assert Path(text).is_absolute()
    assert Path(text) == signalled.job.last.resolve()


@pytest.mark.e2e
@pytest.mark.slow
def test_sigkill_during_checkpoint_write_leaves_a_resumable_checkpoint(
    tmp_path: Path, data_yaml: Path, base_env: dict[str, str]
) -> None:
    job = Job(tmp_path, data_yaml, base_env)
    script, marker = tmp_path / "shim.py", tmp_path / "mid-write"
    script.write_text(SHIM)
    proc = job.start(1, script=script, SLOW_WRITE_MARKER=str(marker))
    wait_for(marker.exists, proc)  # epoch 2's save is half-written
    proc.kill()
    proc.wait(timeout=30)
    partial = temp_path(job.last)
    assert partial.exists() and not zipfile.is_zipfile(partial)
    assert zip_ok(job.last)
    assert result_epochs(job.save_dir) == [1, 2]  # epoch 2's row was written before its checkpoint

    rc, log = job.run(2, resume_from=job.last)
    assert rc == 0, log
    assert "1/2 epochs done" in log
    assert "dropped 1 results.csv row(s) past epoch 1" in log
    assert result_epochs(job.save_dir) == [1, 2]
    assert not partial.exists()


# --- small pieces, no training ------------------------------------------
def test_split_args_reads_yolo_style_arguments() -> None:
    assert split_args(["epochs=3", "--imgsz=64", "resume", "name=x"]) == {
        "epochs": "3", "imgsz": "64", "resume": True, "name": "x",
    }
    with pytest.raises(UsageError):
        split_args(["epochs="])


def test_check_local_refuses_downloads(tmp_path: Path) -> None:
    data = tmp_path / "data.yaml"
    data.write_text("path: x\n")
    with pytest.raises(UsageError, match="would be downloaded"):
        check_local({"model": "yolov8n.pt", "data": str(data)})
    with pytest.raises(UsageError, match="data= is required"):
        check_local({"model": "yolov8n.yaml"})
    with pytest.raises(UsageError, match="not a local file"):
        check_local({"model": "yolov8n.yaml", "data": "coco8.yaml"})
    weights = tmp_path / "mine.pt"
    weights.write_bytes(b"")
    args = {"model": str(weights), "data": os.path.relpath(data)}
    check_local(args)
    assert args["data"] == str(data.resolve())


def test_resume_kwargs_keep_the_original_save_dir(tmp_path: Path) -> None:
    train_args = {"model": "yolov8n.yaml", "epochs": 5, "data": "/d.yaml", "save_dir": "/runs/x", "lr0": 0.01}
    point = ResumePoint(tmp_path / "snap.pt", 2, 5, False, Path("/runs/x"), train_args)
    kwargs = resume_kwargs(point, {"model": "yolov8n.yaml", "epochs": 5, "device": "cpu"}, "0")
    assert kwargs == {"epochs": 5, "device": "0", "data": "/d.yaml", "save_dir": "/runs/x", "resume": str(tmp_path / "snap.pt")}
    first = resume_kwargs(ResumePoint(point.path, 0, 5, False, point.save_dir, train_args), {}, "cpu")
    assert first["resume"] is False and first["save_dir"] == "/runs/x" and first["lr0"] == 0.01 and "model" not in first


def test_trim_results_drops_rows_of_redone_epochs(tmp_path: Path) -> None:
    csv = tmp_path / "results.csv"
    csv.write_text("epoch,time\n1,0.5\n2,1.0\n3,1.5\n")
    assert trim_results(csv, 2) == 1
    assert csv.read_text() == "epoch,time\n1,0.5\n2,1.0\n"
    assert trim_results(csv, 2) == 0
    assert trim_results(tmp_path / "missing.csv", 0) == 0


def test_trim_results_that_cannot_rewrite_the_file_leaves_it_and_training_goes_on(tmp_path: Path) -> None:
    """Only a report: a full disk (here, a directory in the temp file's way) must not end a resume."""
    csv = tmp_path / "results.csv"
    csv.write_bytes(b"epoch,loss\n1,0.5\n2,0.4\n3,0.3\xff\n")  # and a torn byte at the end
    (tmp_path / ".results.csv.partial").mkdir()
    assert trim_results(csv, 2) == 0
    assert csv.read_bytes() == b"epoch,loss\n1,0.5\n2,0.4\n3,0.3\xff\n"


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "last.pt"
    target.write_bytes(b"old")
    write_bytes_atomic(target, b"x" * 3_000_000)
    assert target.read_bytes() == b"x" * 3_000_000
    assert not temp_path(target).exists()


def test_heartbeat_rate_limited(tmp_path: Path) -> None:
    beat = Heartbeat(tmp_path / "hb", interval_s=60)
    beat.beat()
    first = (tmp_path / "hb").stat().st_mtime_ns
    os.utime(tmp_path / "hb", ns=(0, 0))
    beat.beat()  # within the interval: not touched again
    assert (tmp_path / "hb").stat().st_mtime_ns == 0 != first


def test_parse_signal_names() -> None:
    assert parse_signal("SIGUSR1") is signal.SIGUSR1
    assert parse_signal("usr2") is signal.SIGUSR2
    assert parse_signal(str(int(signal.SIGTERM))) is signal.SIGTERM
    with pytest.raises(ValueError, match="unknown signal"):
        parse_signal("SIGNOPE")


def test_ultralytics_loads_of_the_resume_checkpoint_reuse_the_one_already_loaded(tmp_path: Path) -> None:
    """One unpickling on the resumed attempt's critical path, never a stale or a weights-only-bypassing one."""
    torch = pytest.importorskip("torch")
    from ultralytics.nn import tasks

    from gpuguard.integrations.resume import SharedLoad, read_resume_point

    last = tmp_path / "last.pt"
    args = {"epochs": 3, "save_dir": str(tmp_path)}
    torch.save({"epoch": 0, "optimizer": {}, "train_args": args, "ema": torch.nn.Linear(2, 2)}, last)
    point = read_resume_point(last)
    real = tasks.torch_load
    shared = SharedLoad(point)
    try:
        assert tasks.torch_safe_load(str(last))[0] is point.loaded  # the path as Ultralytics names it
        assert tasks.torch_safe_load(last)[0] is point.loaded and shared.served == 2
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            tasks.torch_load(last, weights_only=True)  # a weights-only load still reads (and checks) the file
        other = tmp_path / "other.pt"
        torch.save({"epoch": 1}, other)
        assert tasks.torch_safe_load(other)[0] == {"epoch": 1}
        torch.save({"epoch": 2, "train_args": args}, last)  # the trainer rewrote it
        assert tasks.torch_safe_load(last)[0]["epoch"] == 2 and shared.served == 2
    finally:
        shared.close()
    assert tasks.torch_load is real


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("old", ["no exact state", "another state version"])
def test_a_checkpoint_of_an_earlier_release_resumes_the_ultralytics_way(
    signalled: SignalledRun, tmp_path: Path, old: str
) -> None:
    """gpuguard-yolo before the exact state (or with another version of it) wrote checkpoints that a
    node still running the newer one may be handed: they resume, inexactly, never crash."""
    torch = pytest.importorskip("torch")
    from gpuguard.integrations.exact import STATE_KEY

    ckpt = torch.load(signalled.midway_checkpoints[1], map_location="cpu", weights_only=False)
    assert STATE_KEY in ckpt["train_metrics"]
    if old == "no exact state":
        del ckpt["train_metrics"][STATE_KEY]
    else:
        ckpt["train_metrics"][STATE_KEY] = {"version": 0, "model": {}}
    earlier = tmp_path / "earlier.pt"
    torch.save(ckpt, earlier)
    job = signalled.job
    rc, log = job.finish(job.start(9, resume_from=earlier))
    assert rc == 0, log
    assert "resuming" in log and "resumed with the exact training state" not in log
