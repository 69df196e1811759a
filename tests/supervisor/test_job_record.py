"""Job records: what the store keeps round-trips, old (version 1) records still load,
and the Supervisor loads what it can and skips what it cannot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gpuguard.supervisor import supervisor as supervisor_mod
from gpuguard.supervisor.job import RECORD_VERSION, Attempt, Job
from gpuguard.supervisor.jobspec import JobSpec
from gpuguard.supervisor.process import UserSpec
from gpuguard.supervisor.states import JobState

from .fakes import Node


def through_json(rec: dict[str, Any]) -> dict[str, Any]:
    """As a store would give it back."""
    return json.loads(json.dumps(rec))


def full_job() -> Job:
    spec = JobSpec(
        name="train",
        command=("python", "train.py", "--lr", "0.1"),
        workdir=Path("/srv/work"),
        env={"A": "1", "B": "two"},
        user=UserSpec(1000, 1000, (27, 44)),
        user_name="alice",
        gpus_wanted=2,
        min_gpus=1,
        checkpoint=Path("/srv/work/last.pt"),
        max_restarts=4,
        source="config",
    )
    attempt = Attempt(
        state=JobState.BACKOFF,
        number=3,
        restarts=2,
        crashes=1,
        gpus=["GPU-a", "GPU-b"],
        pid=4242,
        start_time=1700000000.25,
        started_at=1700000001.5,
        backoff_until=1700000100.0,
        reason="exit 1; restart 2 of 4 in 2s",
        exit_code=1,
        after_stop="restart",
        resume_pin="/var/lib/gpuguard/snapshots/train/0003.pt",
        pin_attempt=2,
        pending_resets=["GPU-a"],
        checkpoint_found="/srv/work/runs/last.pt",
    )
    return Job(spec, attempt)


@pytest.mark.parametrize("job", [full_job(), Job(JobSpec("bare", ("true",), Path("/")))], ids=["full", "bare"])
def test_a_record_round_trips(job: Job) -> None:
    rec = job.record()
    assert rec["version"] == RECORD_VERSION and rec["state"] == job.state.value
    loaded = Job.from_record(through_json(rec))
    assert loaded == job
    assert loaded.spec == job.spec and loaded.attempt == job.attempt
    assert Job.from_record(through_json(loaded.record())) == job


def test_the_loaded_types_are_the_real_ones() -> None:
    loaded = Job.from_record(through_json(full_job().record()))
    assert isinstance(loaded.spec.command, tuple) and isinstance(loaded.spec.workdir, Path)
    assert loaded.spec.user == UserSpec(1000, 1000, (27, 44))
    assert isinstance(loaded.state, JobState) and loaded.state == JobState.BACKOFF
    assert loaded.checkpoint == Path("/srv/work/last.pt")


def test_unknown_keys_are_ignored() -> None:
    """A record written by a newer gpuguard with fields this one does not know still loads."""
    rec = through_json(full_job().record())
    rec["spec"]["future"] = 1
    rec["attempt"]["future"] = 2
    rec["extra"] = 3
    assert Job.from_record(rec) == full_job()


def v1_record() -> dict[str, Any]:
    """A record of gpuguard before version 2: spec and attempt in one flat dict,
    `attempt` is the attempt number and `user` a [uid, gid, groups] list."""
    return {
        "name": "old",
        "command": ["python", "train.py"],
        "workdir": "/srv/old",
        "env": {"A": "1"},
        "user": [1001, 1001, [27]],
        "user_name": "bob",
        "gpus_wanted": 1,
        "min_gpus": None,
        "checkpoint": "/srv/old/last.pt",
        "max_restarts": 7,
        "source": "cli",
        "state": "running",
        "attempt": 4,
        "restarts": 3,
        "crashes": 0,
        "gpus": ["GPU-a"],
        "pid": 777,
        "start_time": 1600000000.0,
        "started_at": 1600000001.0,
        "reason": None,
        "exit_code": None,
    }


def test_a_version_1_record_loads() -> None:
    job = Job.from_record(v1_record())
    assert job.spec == JobSpec(
        name="old",
        command=("python", "train.py"),
        workdir=Path("/srv/old"),
        env={"A": "1"},
        user=UserSpec(1001, 1001, (27,)),
        user_name="bob",
        checkpoint=Path("/srv/old/last.pt"),
        max_restarts=7,
        source="cli",
    )
    a = job.attempt
    assert (a.state, a.number, a.restarts, a.gpus, a.pid) == (JobState.RUNNING, 4, 3, ["GPU-a"], 777)
    assert (a.start_time, a.started_at, a.pending_resets, a.after_stop) == (1600000000.0, 1600000001.0, [], None)


def test_a_version_1_record_is_saved_as_version_2() -> None:
    job = Job.from_record(v1_record())
    rec = through_json(job.record())
    assert rec["version"] == RECORD_VERSION and "spec" in rec
    assert Job.from_record(rec) == job


def test_a_version_1_record_without_attempt_or_user() -> None:
    rec = {k: v for k, v in v1_record().items() if k not in ("attempt", "user")}
    job = Job.from_record(rec)
    assert job.attempt.number == 0 and job.spec.user is None


@pytest.mark.parametrize(
    "broken",
    [
        {"spec": {"name": "x"}, "attempt": {"state": "running"}},  # no command
        {"spec": full_job().spec.to_json(), "attempt": {"state": "exploded"}},  # no such state
        {"spec": full_job().spec.to_json(), "attempt": {}},  # no state
        {"name": "x", "command": ["true"], "workdir": "/"},  # version 1 without a state
    ],
)
def test_a_broken_record_raises_what_the_supervisor_skips(broken: dict[str, Any]) -> None:
    with pytest.raises((KeyError, TypeError, ValueError)):
        Job.from_record(through_json(broken))


def test_the_supervisor_loads_good_records_and_skips_broken_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No process: a finished job, an old-format one and an unreadable one."""
    monkeypatch.setattr(supervisor_mod, "become_subreaper", lambda: False)
    node = Node(tmp_path)
    done = Job(JobSpec("done", ("true",), tmp_path), Attempt(state=JobState.SUCCEEDED, number=1))
    old = v1_record() | {"name": "old1", "state": "stopped"}
    node.records.saved = {"done": through_json(done.record()), "old1": old, "bad": {"spec": {}, "attempt": {}}}
    sup = node.supervisor()
    try:
        assert sorted(sup.jobs) == ["done", "old1"]
        assert sup.jobs["done"].state == JobState.SUCCEEDED and sup.jobs["old1"].state == JobState.STOPPED
        assert node.pool.calls == [] and node.log.events == []  # final jobs are left as they are
        assert [v["name"] for v in sup.view()] == ["done", "old1"]
    finally:
        sup.close()
