"""The `Scheduler` port over `[slurm]`: the drain and requeue commands that hand
a job back to Slurm (supervisor/requeue.py decides when).

Each is an argv template from the config, filled in and run by
`actions/argv.py` with `[slurm] timeout_s`, never through a shell. `{job_id}`
and `{node}` come from the job's environment (already checked to be a plain
job id and one node name), so `requeue` runs as the job's user: Slurm lets a
user requeue only their own jobs, so a job that names someone else's job id
gets that refused by Slurm itself. `drain` needs Slurm's operator rights and
runs as the daemon's user (root), so it drains only a node of this host
(`[slurm] nodes`, else its short name): a job that names another node in
SLURMD_NODENAME drains nothing. Calls block: the hand-off worker makes them.
"""

from __future__ import annotations

from collections.abc import Callable

from gpuguard.actions.argv import ArgvRun, fill_argv, run_argv, short_hostname
from gpuguard.config import SlurmConfig
from gpuguard.supervisor.ports import BatchJob, CommandResult


class SlurmCommands:
    """`config` is read at every call, so a SIGHUP reload applies to the next hand-off."""

    def __init__(self, config: Callable[[], SlurmConfig]) -> None:
        self._config = config

    @property
    def requeue_enabled(self) -> bool:
        return bool(self._config().requeue)

    @property
    def store_wait_s(self) -> float:
        return self._config().store_wait_s

    def drain(self, job: BatchJob, reason: str) -> CommandResult | None:
        config = self._config()
        if not config.drain:
            return None
        node = _own_node(job.node, config.nodes or (short_hostname(),))
        if node is None:
            why = f"not run: the job names node {job.node!r}, not one of this host's ({', '.join(config.nodes) or short_hostname()}; [slurm] nodes)"
            return CommandResult((), None, why, "")
        return _result(run_argv(fill_argv(config.drain, _values(job, reason, node)), config.timeout_s))

    def requeue(self, job: BatchJob, reason: str) -> CommandResult:
        config = self._config()
        if not config.requeue:
            return CommandResult((), None, "not configured ([slurm] requeue is empty)", "")
        return _result(run_argv(fill_argv(config.requeue, _values(job, reason, job.node or short_hostname())), config.timeout_s, user=job.user))


def _own_node(named: str | None, served: tuple[str, ...]) -> str | None:
    """The node to drain: the one the job names when it is this host's, the host's only
    one when the job names none; None when the job names another node (root drains
    nothing a caller's environment chose)."""
    if named is None:
        return served[0] if len(served) == 1 else None
    return named if named in served else None


def _values(job: BatchJob, reason: str, node: str) -> dict[str, str]:
    return {"node": node, "job_id": job.job_id, "reason": reason}


def _result(run: ArgvRun) -> CommandResult:
    return CommandResult(run.argv, run.exit_code, run.outcome, run.output_tail, run.timed_out)
