"""Handing a job back to Slurm end to end: a real gpuguardd --simulate 2 with
`[slurm] drain/requeue` pointed at a fake scontrol of the test's own (it
records its argv, one JSON line per call, and exits 0, or 1 for a requeue
when told), and the scripted trainer started by `gpuguardctl run` from a
shell whose environment says it runs in Slurm job 123 on node n1."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from harness import DaemonProc, Running, running_daemon, wait_until

from .trainer_runs import FAST, GRACE_S, TRAINER, attempts, kill_leftovers, running_attempt

pytestmark = pytest.mark.e2e

WAIT_S = GRACE_S + 20


class Slurm:
    """A daemon with [slurm] commands that run the fake scontrol."""

    def __init__(self, tmp: Path, daemons: ExitStack, *, requeue_exit: int = 0) -> None:
        self.calls = tmp / "scontrol-calls.jsonl"
        script = tmp / "scontrol.py"
        script.write_text(
            "import json, sys\n"
            f"with open({str(self.calls)!r}, 'a') as f:\n"
            "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
            f"if sys.argv[1] == 'requeue' and {requeue_exit}:\n"
            "    print('scontrol: error: Requested operation is presently disabled for job', sys.argv[2])\n"
            f"    sys.exit({requeue_exit})\n"
        )
        fake = [sys.executable, str(script)]
        config = FAST + (
            "[slurm]\n"
            f"drain = {json.dumps([*fake, 'update', 'nodename={node}', 'state=drain', 'reason={reason}'])}\n"
            f"requeue = {json.dumps([*fake, 'requeue', '{job_id}'])}\n"
            "timeout_s = 10.0\n"
            'nodes = ["n1"]\n'  # the Slurm node this daemon serves (the jobs say SLURMD_NODENAME=n1)
        )
        self.daemon: DaemonProc = daemons.enter_context(running_daemon(tmp, 2, config))

    def called(self) -> list[list[str]]:
        try:
            return [json.loads(line) for line in self.calls.read_text().splitlines()]
        except FileNotFoundError:
            return []


@pytest.fixture
def slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Slurm]]:
    """Make a Slurm daemon; the trainers of tmp_path/work are ended at the end, before the daemon."""
    with ExitStack() as daemons:
        try:
            yield lambda **kw: Slurm(tmp_path, daemons, **kw)
        finally:
            kill_leftovers([tmp_path / "work"])


def in_slurm_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test's shell (and so what `gpuguardctl run` sends) is inside Slurm job 123 on n1."""
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("SLURMD_NODENAME", "n1")


def run_args(work: Path) -> list[str]:
    return ["run", "--name", "j", "--checkpoint", "ck.pt", "--workdir", str(work), "--", sys.executable, str(TRAINER)]


def job_state(state: str) -> Callable[[dict[str, Any]], bool]:
    return lambda s: any(j["name"] == "j" and j["state"] == state for j in s["jobs"])


def test_xid_79_checkpoints_drains_and_requeues(slurm: Callable[..., Slurm], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = slurm()
    d = s.daemon
    in_slurm_job(monkeypatch)
    work = tmp_path / "work"
    work.mkdir()
    waiting = Running(d, *run_args(work)[:1], "--wait", *run_args(work)[1:])
    try:
        running_attempt(d, "j", work)
        d.ctl("inject", "0", "xid", "79")
        code, err = waiting.wait()
    finally:
        waiting.close()
    assert code == 75, err
    assert "requeued" in err and "the scheduler will restart it elsewhere" in err
    drain, requeue = s.called()
    assert drain[:3] == ["update", "nodename=n1", "state=drain"]
    assert drain[3].startswith("reason=gpuguard: GPU 0: ") and "\n" not in drain[3]
    assert requeue == ["requeue", "123"]
    job = d.job("j")
    assert job["state"] == "requeued" and job["gpus"] == [] and "job 123" in job["reason"]
    kinds = d.kinds(job="j")
    order = ["checkpoint_requested", "job_handoff", "node_drained", "job_requeued"]
    assert [k for k in kinds if k in order] == order
    assert "job_restarted" not in kinds
    assert len(attempts(work)) == 1  # it saved on the signal and never ran again here
    (saved,) = d.events("job_handoff", job="j")
    assert saved["slurm_job_id"] == "123" and saved["node_fault"] is True

    # Slurm may bring it back to this node: the same name is accepted and resumes from its snapshot
    d.ctl(*run_args(work))
    d.wait_for(job_state("running"), WAIT_S, "the job to run again")
    again = wait_until(lambda: attempts(work)[1:], WAIT_S, "the new job's first attempt")[0]
    assert again["env"]["GPUGUARD_ATTEMPT"] == "1"  # a new job of the same name
    assert again["env"]["CUDA_VISIBLE_DEVICES"] == d.gpu(1)["uuid"]
    assert again["env"].get("GPUGUARD_RESUME_FROM")
    d.ctl("stop", "j")


def test_too_few_healthy_gpus_drain_and_requeue(slurm: Callable[..., Slurm], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU 1 excluded by the operator, a reset-class Xid on GPU 0: no GPU left here for the job."""
    s = slurm()
    d = s.daemon
    in_slurm_job(monkeypatch)
    d.ctl("exclude", "1", "--reason", "cable")
    work = tmp_path / "work"
    work.mkdir()
    d.ctl(*run_args(work))
    running_attempt(d, "j", work)
    d.ctl("inject", "0", "xid", "95")
    d.wait_for(job_state("requeued"), WAIT_S, "the job to be requeued")
    drain, requeue = s.called()
    assert drain[3] == "reason=gpuguard: 0 of 2 GPUs healthy, the job needs 1"
    assert requeue == ["requeue", "123"]
    (handoff,) = d.events("job_handoff", job="j")
    assert handoff["node_fault"] is False
    assert [e["kind"] for e in d.events("node_drained")] == ["node_drained"]


def test_a_job_outside_slurm_moves_to_the_other_gpu(slurm: Callable[..., Slurm], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = slurm()
    d = s.daemon
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    d.ctl(*run_args(work))
    running_attempt(d, "j", work)
    d.ctl("inject", "0", "xid", "79")
    second = running_attempt(d, "j", work, attempt=2)
    assert second["env"]["CUDA_VISIBLE_DEVICES"] == d.gpu(1)["uuid"]
    assert s.called() == []
    assert "job_handoff" not in d.kinds(job="j")
    d.ctl("stop", "j")


def test_a_failed_requeue_leaves_the_job_waiting_here(slurm: Callable[..., Slurm], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = slurm(requeue_exit=1)
    d = s.daemon
    in_slurm_job(monkeypatch)
    d.ctl("exclude", "1")
    work = tmp_path / "work"
    work.mkdir()
    d.ctl(*run_args(work))
    running_attempt(d, "j", work)
    d.ctl("inject", "0", "xid", "79")
    (failed,) = wait_until(lambda: d.events("slurm_requeue_failed", job="j"), WAIT_S, "the failed requeue")
    assert failed["severity"] == "error" and failed["exit_code"] == 1
    assert "presently disabled" in failed["message"] and failed["output_tail"].endswith("123")
    d.wait_for(job_state("waiting"), WAIT_S, "the job to wait here")
    assert [c[0] for c in s.called()] == ["update", "requeue"]
    assert "job_requeued" not in d.kinds(job="j")
    d.ctl("stop", "j")
