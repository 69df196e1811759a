"""A torchrun DDP job (2 CPU workers, gloo) under a real gpuguardd --simulate 2.

torchrun's workers run in sessions of their own, so these tests check by pid
that gpuguard's stop reaches every process of the tree, and that a GPU fault
ends in a checkpoint written by rank 0 alone and a resume from it. See
docs/DDP.md for why the job runs torchrun with `--signals-to-handle ...SIGUSR1`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from harness import DaemonProc, gone, running_daemon, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

torch = pytest.importorskip("torch")

JOB = Path(__file__).with_name("ddp_job.py")

CONFIG = "[jobs]\ncheckpoint_grace_s = 20.0\nstop_timeout_s = 2.0\n"
START_S = 45.0  # three torch imports on a busy 2-core machine




def lines(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines()]
    except FileNotFoundError:
        return []


def ranks_of(work: Path, attempt: int) -> list[dict[str, Any]]:
    """The start records of both ranks of one attempt, rank 0 first; [] until both exist."""
    found = [r for r in lines(work / "ranks.jsonl") if r["attempt"] == str(attempt)]
    return sorted(found, key=lambda r: r["rank"]) if len(found) == 2 else []




class DdpSetup:
    """A daemon, a job workdir, and the pids to clean up if a test leaves any behind."""

    def __init__(self, tmp: Path, daemon: DaemonProc) -> None:
        self.daemon = daemon
        self.work = tmp / "work"
        self.work.mkdir()
        self.pids: set[int] = set()

    def run(self, name: str, *torchrun_flags: str) -> None:
        self.daemon.ctl(
            "run", "--name", name, "--checkpoint", "ck.pt", "--workdir", str(self.work), "--",
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            *torchrun_flags, str(JOB), "--every", "5",
        )

    def tree(self, name: str, attempt: int) -> tuple[int, int, list[int]]:
        """(gpuguard's main pid, torchrun's pid, the workers' pids) of a running attempt."""
        ranks = wait_until(lambda: ranks_of(self.work, attempt), START_S, f"both ranks of attempt {attempt}")
        job = self.daemon.job(name)
        agent = ranks[0]["ppid"]
        workers = [r["pid"] for r in ranks]
        self.pids |= {job["pid"], agent, *workers}
        return job["pid"], agent, workers

    def log(self, name: str) -> str:
        path = self.daemon.state_dir / "jobs" / name / "output.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def cleanup(self) -> None:
        """Jobs outlive their daemon by design: end what these tests started, checked by command line."""
        for pid in self.pids:
            try:
                proc = psutil.Process(pid)
                if any("ddp_job" in a or "exitcode" in a for a in proc.cmdline()):
                    proc.kill()
            except psutil.Error:
                continue


@pytest.fixture
def ddp(tmp_path: Path) -> Iterator[DdpSetup]:
    s: DdpSetup | None = None
    try:
        with running_daemon(tmp_path, gpus=2, extra_config=CONFIG) as d:
            s = DdpSetup(tmp_path, d)
            yield s
    finally:  # after the daemon's stop
        if s is not None:
            s.cleanup()


def test_xid_79_stops_the_whole_tree_and_resumes_from_rank_0(ddp: DdpSetup) -> None:
    d = ddp.daemon
    gpu0, gpu1 = d.gpu(0)["uuid"], d.gpu(1)["uuid"]
    ddp.run("ddp")  # no --signals-to-handle: gpuguard's PET_SIGNALS_TO_HANDLE makes torchrun pass SIGUSR1 on
    main, agent, workers = ddp.tree("ddp", 1)
    assert all(os.getsid(w) == w != os.getsid(main) for w in workers)  # torchrun's own sessions
    wait_until(lambda: lines(ddp.work / "saves.jsonl"), START_S, "a periodic checkpoint")

    d.ctl("inject", "0", "xid", "79")
    _, _, workers2 = ddp.tree("ddp", 2)  # also registers attempt 2 for the cleanup
    second = ranks_of(ddp.work, 2)
    assert all(gone(pid) for pid in (main, agent, *workers)), ddp.log("ddp")

    resume = Path(second[0]["resume"])
    assert second[1]["resume"] == str(resume) and resume.is_relative_to(d.state_dir / "snapshots")
    state = torch.load(resume, map_location="cpu", weights_only=True)
    assert state["rank"] == 0 and all(r["start_step"] == state["step"] > 0 for r in second)
    saves = lines(ddp.work / "saves.jsonl")
    assert {s["rank"] for s in saves} == {0} and {s["pid"] for s in saves} <= {workers[0], workers2[0]}
    assert state["step"] == max(s["step"] for s in saves if s["pid"] == workers[0])  # attempt 1's last save
    log = ddp.log("ddp")
    assert "rank 0: checkpoint at step" in log and "rank 1: checkpoint at step" in log  # the signal reached both

    job = d.job("ddp")
    assert job["attempt"] == 2 and job["gpus"] == [gpu1] and job["restarts"] == 1
    # torchrun ends 1 however its workers exited (or, now and then, aborts in its own teardown:
    # seen once on a CI run as -6); 75 cannot come through, and gpuguard restarts it all the same
    assert job["exit_code"] in (1, -signal.SIGABRT)
    kinds = d.kinds(job="ddp")
    assert "checkpoint_requested" in kinds and "job_crashed" not in kinds
    assert d.gpu(0)["state"] == "excluded" and gpu0 not in job["gpus"]


def test_stop_removes_workers_in_new_sessions_even_when_torchrun_dies_first(
    ddp: DdpSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchrun told to handle only its default signals (the user's own choice, kept by gpuguard)
    would die of SIGUSR1 at once, leaving its workers orphaned in their own sessions: it is not
    sent it (checkpoint_unsupported) and the whole tree, workers included, goes on SIGTERM."""
    d = ddp.daemon
    monkeypatch.setenv("PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT")  # sent with `run`
    ddp.run("plain")
    main, agent, workers = ddp.tree("plain", 1)
    d.ctl("stop", "plain")
    d.wait_for(lambda s: any(j["name"] == "plain" and j["state"] == "stopped" for j in s["jobs"]), 15, "stopped")
    assert all(gone(pid) for pid in (main, agent, *workers)), ddp.log("plain")
    events = d.events(job="plain")
    stopped = next(e for e in events if e["kind"] == "job_stopped")
    assert "checkpoint_unsupported" in [e["kind"] for e in events]
    assert f"exit -{int(signal.SIGUSR1)}" not in stopped["message"]  # torchrun was not killed by the signal
    assert "checkpoint at step" not in ddp.log("plain")  # the workers never saw the checkpoint signal
