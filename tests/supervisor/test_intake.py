"""The checkpoint intake's watcher callback: a job that is over on this node takes no more
snapshots (with a run directory shared between nodes, the next node's writes land there)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from checkpoint_files import make_checkpoint
from gpuguard.supervisor.files import JobFiles
from gpuguard.supervisor.intake import CheckpointIntake
from gpuguard.supervisor.job import Job
from gpuguard.supervisor.jobspec import JobSpec
from gpuguard.supervisor.snapshots import SnapshotRing
from gpuguard.supervisor.states import FINAL, JobState


@pytest.fixture
def intake(tmp_path: Path) -> Iterator[tuple[CheckpointIntake, dict[str, Job]]]:
    jobs: dict[str, Job] = {}
    files = JobFiles(tmp_path / "jobs", tmp_path / "run")
    ring = SnapshotRing(tmp_path / "snapshots", max_bytes=10**9)
    said: list[str] = []
    taken = CheckpointIntake(ring, files, jobs.get, lambda job, kind, sev, msg: said.append(kind), lambda job: True)
    yield taken, jobs
    taken.close()


def _job(jobs: dict[str, Job], tmp_path: Path, state: JobState) -> tuple[Job, Path]:
    ckpt = tmp_path / "work" / "last.pt"
    job = Job(JobSpec(name="yolo", command=("true",), workdir=tmp_path / "work", user=None, checkpoint=ckpt))
    job.attempt.state = state
    jobs[job.name] = job
    return job, ckpt


def test_a_running_job_s_checkpoint_write_is_snapshotted(intake: tuple[CheckpointIntake, dict[str, Job]], tmp_path: Path) -> None:
    taken, jobs = intake
    _, ckpt = _job(jobs, tmp_path, JobState.RUNNING)
    make_checkpoint(ckpt, epoch=1)
    taken._on_checkpoint("yolo", ckpt)  # what the watcher's thread calls
    assert len(taken.ring.list("yolo")) == 1


@pytest.mark.parametrize("state", sorted(FINAL))
def test_a_job_over_on_this_node_takes_no_more_snapshots(
    intake: tuple[CheckpointIntake, dict[str, Job]], tmp_path: Path, state: JobState
) -> None:
    taken, jobs = intake
    _, ckpt = _job(jobs, tmp_path, state)
    make_checkpoint(ckpt, epoch=2)  # e.g. the node the job was requeued to, in a shared directory
    taken._on_checkpoint("yolo", ckpt)
    assert taken.ring.list("yolo") == []


def test_an_ingest_waits_for_the_watcher_s_copy_of_the_same_write_instead_of_copying_it_again(
    intake: tuple[CheckpointIntake, dict[str, Job]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer's last write before its exit 75: the watcher starts copying it, then the stop worker's
    ingest asks for the same write. One copy, and the ingest returns only once it is in the ring."""
    taken, jobs = intake
    job, ckpt = _job(jobs, tmp_path, JobState.RUNNING)
    make_checkpoint(ckpt, epoch=3)
    real_add, adds, copying, go_on = taken.ring.add, [], threading.Event(), threading.Event()

    def slow_add(*args: Any, **kwargs: Any) -> Any:
        adds.append(args[1])
        copying.set()
        assert go_on.wait(30)
        return real_add(*args, **kwargs)

    monkeypatch.setattr(taken.ring, "add", slow_add)
    watcher = threading.Thread(target=taken._on_checkpoint, args=("yolo", ckpt))
    watcher.start()
    assert copying.wait(30)
    ingest = threading.Thread(target=taken.ingest, args=(job,))
    ingest.start()
    ingest.join(0.5)
    assert ingest.is_alive()  # waiting for the watcher's copy...
    go_on.set()
    ingest.join(30)
    watcher.join(30)
    assert not ingest.is_alive() and adds == [ckpt]  # ...not making a second
    assert len(taken.ring.list("yolo")) == 1
