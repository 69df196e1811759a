"""Real YOLO training (CPU, 64 px) as a gpuguard job on simulated GPUs."""

from __future__ import annotations

import csv
import json
import os
import signal
import time
from pathlib import Path

import psutil

from daemon.conftest import BIN, DaemonProc
from gpuguard import demo


def _epochs(results: Path) -> list[int]:
    rows = list(csv.DictReader(results.open()))
    return [int(float(r["epoch"])) for r in rows]


def test_demo_recovers_from_xid_79_and_completes_every_epoch(tmp_path: Path, capsys) -> None:
    """`make demo` itself: Xid 79 after the first epoch, resume on the other GPU."""
    assert demo.main(["--keep", str(tmp_path), "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "completed every epoch" in out
    assert _epochs(tmp_path / "runs" / "demo" / "results.csv") == [1, 2, 3]
    # the next attempt resumed from a checkpoint: it did not start from epoch 1 again
    log = (tmp_path / "state" / "jobs" / "yolo" / "output.log").read_text()
    assert "Resuming training" in log or "resume" in log.lower()
    import torch
    from ultralytics import YOLO

    for name in ("last.pt", "best.pt"):
        path = tmp_path / "runs" / "demo" / "weights" / name
        torch.load(path, weights_only=False)
        YOLO(str(path))


def _trainer(job_pid: int) -> psutil.Process:
    """The gpuguard-yolo process under the job's wrapper."""
    for child in psutil.Process(job_pid).children(recursive=True):
        if any("gpuguard-yolo" in part or "integrations.ultralytics" in part for part in child.cmdline()):
            return child
    raise AssertionError("no trainer process found under the job")


def test_sigstopped_trainer_is_seen_as_hung_restarted_and_completes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    os.system(f"{BIN / 'gpuguard-yolo'} make-dataset {data} --train 96 > /dev/null")
    proc = DaemonProc(
        tmp_path,
        extra_config="hang_timeout_s = 3.0\n[jobs]\ncheckpoint_grace_s = 2.0\nstop_timeout_s = 1.0\n",
    )
    # hang_timeout_s belongs to [monitor], which DaemonProc's config ends with
    proc.start()
    try:
        project = tmp_path / "runs"
        proc.ctl(
            "run", "--name", "y", "--workdir", str(tmp_path), "--",
            str(BIN / "gpuguard-yolo"), "train", "model=yolov8n.yaml", f"data={data / 'data.yaml'}", "epochs=3",
            "imgsz=64", "batch=8", "workers=0", f"project={project}", "name=h", "plots=False",
        )  # fmt: skip

        def events() -> list[dict]:
            return json.loads(proc.ctl("events", "--json", "--job", "y", "--limit", "200").stdout)

        deadline = time.monotonic() + 120
        while not any(e["kind"] == "snapshot_saved" for e in events()):
            assert time.monotonic() < deadline, "no checkpoint after the first epoch"
            time.sleep(0.2)
        job = next(j for j in proc.status()["jobs"] if j["name"] == "y")
        trainer = _trainer(job["pid"])
        trainer.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        deadline = time.monotonic() + 60
        while not any(e["kind"] == "hang" for e in events()):
            assert time.monotonic() < deadline, "the hang was not detected"
            time.sleep(0.2)
        assert time.monotonic() - stopped_at >= 2.5  # not before hang_timeout_s of idleness
        deadline = time.monotonic() + 240
        while True:
            job = next(j for j in proc.status()["jobs"] if j["name"] == "y")
            if job["state"] in ("succeeded", "failed"):
                break
            assert time.monotonic() < deadline, f"the run did not complete: {job}"
            time.sleep(0.5)
        assert job["state"] == "succeeded", job
        assert job["attempt"] >= 2
        assert not psutil.pid_exists(trainer.pid) or trainer.status() == psutil.STATUS_ZOMBIE
        assert _epochs(project / "h" / "results.csv") == [1, 2, 3]
        kinds = [e["kind"] for e in events()]
        assert "hang" in kinds and "job_restarted" in kinds
    finally:
        proc.stop()


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
    proc = DaemonProc(tmp_path, extra_config=extra)
    proc.start()
    try:
        deadline = time.monotonic() + 180
        while True:
            job = next(j for j in proc.status()["jobs"] if j["name"] == "cfg-yolo")
            if job["state"] in ("succeeded", "failed"):
                break
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
        assert job["state"] == "succeeded", job
        assert job["command"][1:5] == ["train", "--save-every-s", "300", "batch=8"]
        assert job["checkpoint_path"] == str(project / "cfg" / "weights" / "last.pt")
        assert _epochs(project / "cfg" / "results.csv") == [1]
    finally:
        proc.stop()
