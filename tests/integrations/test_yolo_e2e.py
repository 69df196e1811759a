"""Real YOLO training (CPU, 64 px) as a gpuguard job on simulated GPUs."""

from __future__ import annotations

import csv
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from harness import BIN, DaemonProc, running_daemon, wait_until
from gpuguard import demo

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _epochs(results: Path) -> list[int]:
    rows = list(csv.DictReader(results.open()))
    return [int(float(r["epoch"])) for r in rows]


@pytest.mark.timeout(900)  # 3 YOLO epochs; on a loaded machine (the flake budget) past 120 s
def test_demo_recovers_from_xid_79_and_completes_every_epoch(tmp_path: Path, capsys) -> None:
    """`make demo` itself: Xid 79 after the first epoch, resume on the other GPU."""
    assert demo.main(["--keep", str(tmp_path), "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "completed every epoch" in out
    # the training shown as it happens, before the first checkpoint and after the resume
    waiting = out.index("waiting for the first epoch's checkpoint")
    assert re.search(r"^   \[yolo\] +1/3 .*12/12", out[waiting:out.index("== 3. Xid 79")], re.MULTILINE)
    # the resumed attempt's training streamed too (a resumed partial epoch's bar ends at the
    # batches it had left, e.g. 7/12, so no whole-epoch count is asked for here)
    resumed = out[out.index("gpuguard-yolo: resuming"):]
    assert re.search(r"^   \[yolo\] +[23]/3 .* \d+/12 ", resumed, re.MULTILINE)
    assert _epochs(tmp_path / "runs" / "demo" / "results.csv") == [1, 2, 3]
    # the next attempt resumed from a snapshot of the checkpoint: it did not start from epoch 1 again
    log = (tmp_path / "state" / "jobs" / "yolo" / "output.log").read_text()
    resumed = re.search(r"gpuguard-yolo: resuming (\S+) from (\S+): (\d)/3 epochs done, attempt 2\n", log)
    assert resumed is not None, log[-3000:]
    save_dir, snapshot, done = Path(resumed[1]), Path(resumed[2]), int(resumed[3])
    assert save_dir == (tmp_path / "runs" / "demo").resolve()
    assert snapshot.is_relative_to((tmp_path / "state" / "snapshots" / "yolo").resolve())
    if done >= 1:  # a whole epoch was saved: Ultralytics' own resume continues after it, from that snapshot
        assert f"Resuming training {snapshot} from epoch {done + 1} to 3 total epochs" in log
    import torch
    from ultralytics import YOLO

    from gpuguard.integrations.resume import read_resume_point

    for name in ("last.pt", "best.pt"):
        path = tmp_path / "runs" / "demo" / "weights" / name
        ckpt = torch.load(path, weights_only=False)
        assert ckpt["train_args"]["epochs"] == 3 and ckpt["model"] is not None
        assert ckpt["optimizer"] is None and ckpt["epoch"] == -1  # stripped by the final evaluation
        assert read_resume_point(path).finished  # a later restart would have nothing to resume
        model = YOLO(str(path))
        assert model.task == "detect" and sum(p.numel() for p in model.model.parameters()) > 0


def test_log_tail_gives_each_new_line_once(tmp_path: Path) -> None:
    """Progress bars update with \\r; a line cut mid-write (or mid-character) waits for its end."""
    log = tmp_path / "output.log"
    tail = demo.LogTail(log, "[yolo] ")
    assert tail.new_lines() == []  # the job has not started
    data = "start\n\r\x1b[K  1/3 ━─ 1/12\r\x1b[K  1/3 ━━ 2/12\n\n" + "x" * 500 + "\ndone"
    raw = data.encode()
    cut = raw.index("━".encode()) + 1  # inside a UTF-8 character
    log.write_bytes(raw[:cut])
    assert tail.new_lines() == ["[yolo] start"]
    with log.open("ab") as f:
        f.write(raw[cut:])
    assert tail.new_lines() == ["[yolo]   1/3 ━─ 1/12", "[yolo]   1/3 ━━ 2/12", "[yolo] " + "x" * 159 + "…"]
    with log.open("ab") as f:
        f.write(b"\n")
    assert tail.new_lines() == ["[yolo] done"]


def _trainer(job_pid: int) -> psutil.Process:
    """The gpuguard-yolo process under the job's wrapper."""
    for child in psutil.Process(job_pid).children(recursive=True):
        if any("gpuguard-yolo" in part or "integrations.ultralytics" in part for part in child.cmdline()):
            return child
    raise AssertionError("no trainer process found under the job")


def _final(d: DaemonProc, name: str, timeout_s: float) -> dict[str, Any]:
    """The job once it has succeeded or failed."""
    return wait_until(
        lambda: (job := d.job(name))["state"] in ("succeeded", "failed") and job, timeout_s, f"{name} to end", 0.5
    )  # fmt: skip


def test_sigstopped_trainer_is_seen_as_hung_restarted_and_completes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    os.system(f"{BIN / 'gpuguard-yolo'} make-dataset {data} --train 96 > /dev/null")
    # hang_timeout_s belongs to [monitor], which DaemonProc's config ends with
    config = "hang_timeout_s = 3.0\n[jobs]\ncheckpoint_grace_s = 2.0\nstop_timeout_s = 1.0\n"
    with running_daemon(tmp_path, extra_config=config) as proc:
        project = tmp_path / "runs"
        proc.ctl(
            "run", "--name", "y", "--workdir", str(tmp_path), "--",
            str(BIN / "gpuguard-yolo"), "train", "model=yolov8n.yaml", f"data={data / 'data.yaml'}", "epochs=3",
            "imgsz=64", "batch=8", "workers=0", f"project={project}", "name=h", "plots=False",
        )  # fmt: skip
        wait_until(lambda: proc.events("snapshot_saved", job="y"), 120, "a checkpoint after the first epoch", 0.2)
        trainer = _trainer(proc.job("y")["pid"])
        trainer.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        wait_until(lambda: proc.events("hang", job="y"), 60, "the hang detected", 0.2)
        assert time.monotonic() - stopped_at >= 2.5  # not before hang_timeout_s of idleness
        job = _final(proc, "y", 240)
        assert job["state"] == "succeeded", job
        assert job["attempt"] >= 2
        assert not psutil.pid_exists(trainer.pid) or trainer.status() == psutil.STATUS_ZOMBIE
        assert _epochs(project / "h" / "results.csv") == [1, 2, 3]
        kinds = proc.kinds(job="y")
        assert "hang" in kinds and "job_restarted" in kinds


def test_yolo_job_from_the_config_trains(tmp_path: Path) -> None:
    """[[job]] with yolo = { ... }: the same gpuguard-yolo, no command written."""
    data = tmp_path / "data"
    os.system(f"{BIN / 'gpuguard-yolo'} make-dataset {data} > /dev/null")
    project = tmp_path / "runs"
    extra = (
        "[[job]]\n"
        'name = "cfg-yolo"\n'
        f'workdir = "{tmp_path}"\n'
        f'yolo = {{ model = "yolov8n.yaml", data = "{data / "data.yaml"}", epochs = 1, imgsz = 64, batch = 8, '
        f'workers = 0, project = "{project}", name = "cfg", plots = false, save_every_s = 300 }}\n'
    )
    with running_daemon(tmp_path, extra_config=extra) as proc:
        job = _final(proc, "cfg-yolo", 180)
        assert job["state"] == "succeeded", job
        assert job["command"][1:5] == ["train", "--save-every-s", "300", "batch=8"]
        assert job["checkpoint_path"] == str(project / "cfg" / "weights" / "last.pt")
        assert _epochs(project / "cfg" / "results.csv") == [1]
