"""The loopback cluster itself: Slurm runs batch jobs on its nodes, and each node has
its own gpuguardd on simulated GPUs."""

from __future__ import annotations

import pytest

from harness import wait_until
from lab.cluster import Cluster

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]


def test_a_batch_job_runs_on_n1(cluster: Cluster) -> None:
    work = cluster.dir / "work" / "smoke"
    work.mkdir(parents=True)
    script = work / "hello.sh"
    script.write_text('#!/bin/bash\necho "node=$SLURMD_NODENAME"\n')
    out = work / "hello.out"
    job = cluster.slurm.sbatch(script, "-o", str(out), "--nodelist", "n1")
    state = wait_until(
        lambda: (s := cluster.slurm.job(job).get("JobState")) in ("COMPLETED", "FAILED", "CANCELLED") and s,
        60, "the batch job to end",
    )  # fmt: skip
    assert state == "COMPLETED"
    assert "node=n1" in out.read_text()


def test_each_node_has_its_own_daemon(cluster: Cluster) -> None:
    sockets = set()
    for node, daemon in cluster.daemons.items():
        status = daemon.status()
        assert status["daemon"]["backend"] == "simulated", node
        assert [g["state"] for g in status["gpus"]] == ["healthy", "healthy"], node
        sockets.add(daemon.socket)
    assert len(sockets) == len(cluster.daemons) == 2
