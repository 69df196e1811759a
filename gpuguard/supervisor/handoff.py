"""Must a job leave this node? A pure function of the job's environment and the
GPU facts, so the choice is tested without processes or a scheduler.

A job is handed back to the batch scheduler only when it runs inside one (a
well-formed SLURM_JOB_ID in the environment `run` sent) and this node cannot
run it: a node-level fault (a reboot-class verdict such as Xid 79) on one of
its GPUs, or fewer healthy GPUs on the node than it needs. Everything else
stays as without a scheduler: the job moves to other GPUs here, or waits.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gpuguard.contract import SLURM_NODE_NAME
from gpuguard.health.types import Action, GpuState
from gpuguard.supervisor.ports import BatchJob, Facts, GpuFacts

JOB_ID_VAR = "SLURM_JOB_ID"
NODE_VAR = "SLURMD_NODENAME"
# The values come from the caller's environment and reach commands the daemon runs
# as root: a job id is digits only, a node name one name (no host list such as
# "n[1-9]" or "n1,n2", which `scontrol update nodename=` would take as many nodes).
_JOB_ID = re.compile(r"[0-9]{1,10}")
REASON_MAX = 200  # Slurm keeps a node's reason as one short line


@dataclass(frozen=True, slots=True)
class Leave:
    """Why the job cannot go on on this node."""

    reason: str  # one line: for the drain's {reason} and the events
    node_fault: bool  # a node-level fault (else: too few healthy GPUs)


def batch_job(env: Mapping[str, str], user: tuple[int, int, tuple[int, ...]] | None) -> BatchJob | None:
    """The Slurm job a managed job runs in, or None (not in an allocation, or an id
    that is not a Slurm job id). A malformed node name falls back to the host name."""
    job_id = env.get(JOB_ID_VAR, "")
    if not _JOB_ID.fullmatch(job_id):
        return None
    node = env.get(NODE_VAR, "")
    return BatchJob(job_id, node if SLURM_NODE_NAME.fullmatch(node) else None, user)


def must_leave(own: Sequence[GpuFacts], facts: Facts, needs: int) -> Leave | None:
    """Why a job whose GPUs were `own` cannot go on on this node, or None.

    `needs` is the fewest GPUs it can run on (min_gpus, else gpus). Healthy means
    what placement takes: neither faulted, excluded, resetting, degraded nor unknown.
    """
    for gpu in own:
        if gpu.action == Action.REBOOT_NODE and gpu.state != GpuState.HEALTHY:
            return Leave(one_line(f"GPU {gpu.index}: {gpu.reason or 'reboot the node'}"), True)
    healthy = sum(1 for gpu in facts.values() if gpu.state == GpuState.HEALTHY)
    if healthy < needs:
        return Leave(f"{healthy} of {len(facts)} GPUs healthy, the job needs {needs}", False)
    return None


def one_line(text: str) -> str:
    """Whitespace (newlines included) folded to single spaces, at most REASON_MAX characters."""
    folded = " ".join(text.split())
    return folded if len(folded) <= REASON_MAX else folded[: REASON_MAX - 3] + "..."
