"""Job states and the one function that moves between them (stdlib only).

Side effects live in the supervisor; this module only says which moves are
legal, so a bug there is an error here rather than a job in a state nobody
planned for.
"""

from __future__ import annotations

import enum


class JobState(enum.StrEnum):
    STARTING = "starting"  # being spawned on its GPUs
    RUNNING = "running"
    CHECKPOINTING = "checkpointing"  # checkpoint signal sent, waiting up to the grace
    STOPPING = "stopping"  # SIGTERM/SIGKILL of the tree under way
    BACKOFF = "backoff"  # crashed; waiting before the next attempt
    WAITING = "waiting"  # no healthy GPU can take it now
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"  # stopped by an operator
    REQUEUEING = "requeueing"  # stopped; cannot go on on this node: being handed back to the batch scheduler
    REQUEUED = "requeued"  # handed back: the scheduler restarts it on another node


class JobEvent(enum.StrEnum):
    SPAWNED = "spawned"  # the process is up
    SPAWN_FAILED = "spawn_failed"
    ADOPTED = "adopted"
    NO_GPUS = "no_gpus"
    GPUS_FREE = "gpus_free"
    FAULT = "fault"  # a GPU under it went bad: ask for a checkpoint
    HANG = "hang"
    STOP_REQUESTED = "stop_requested"  # operator: stop for good
    TERMINATING = "terminating"  # grace over (or no checkpoint asked): SIGTERM the tree
    EXITED_OK = "exited_ok"  # exit 0
    EXITED_RESTART = "exited_restart"  # exit 75, or stopped after a fault: start again
    CRASHED = "crashed"  # a non-zero exit with restarts left
    RESTART_REQUESTED = "restart_requested"  # exit 75 nobody asked for: restart after a back-off
    RESTART_DELAYED = "restart_delayed"  # stopped for a fault again soon after the last move: back off
    GAVE_UP = "gave_up"  # a crash past max_restarts
    STOPPED = "stopped"  # the tree is gone after an operator stop
    BACKOFF_OVER = "backoff_over"
    ROLLBACK = "rollback"
    HAND_OFF = "hand_off"  # stopped after a fault, and this node cannot run it: requeue it
    REQUEUED = "requeued"  # the scheduler took it back
    HANDOFF_FAILED = "handoff_failed"  # the requeue failed: restart here as after any fault stop


FINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.STOPPED, JobState.REQUEUED})
ACTIVE = frozenset({JobState.STARTING, JobState.RUNNING, JobState.CHECKPOINTING, JobState.STOPPING})

_S, _E = JobState, JobEvent
_MOVES: dict[tuple[JobState, JobEvent], JobState] = {
    (_S.STARTING, _E.SPAWNED): _S.RUNNING,
    (_S.STARTING, _E.SPAWN_FAILED): _S.FAILED,
    (_S.STARTING, _E.ADOPTED): _S.RUNNING,  # a new daemon found the process of an attempt it had not seen run
    (_S.STARTING, _E.NO_GPUS): _S.WAITING,
    (_S.WAITING, _E.GPUS_FREE): _S.STARTING,
    (_S.BACKOFF, _E.BACKOFF_OVER): _S.STARTING,
    (_S.RUNNING, _E.FAULT): _S.CHECKPOINTING,
    (_S.RUNNING, _E.HANG): _S.CHECKPOINTING,
    (_S.RUNNING, _E.TERMINATING): _S.STOPPING,
    (_S.CHECKPOINTING, _E.TERMINATING): _S.STOPPING,
    (_S.RUNNING, _E.EXITED_OK): _S.SUCCEEDED,
    (_S.RUNNING, _E.EXITED_RESTART): _S.STARTING,
    (_S.RUNNING, _E.CRASHED): _S.BACKOFF,
    (_S.RUNNING, _E.RESTART_REQUESTED): _S.BACKOFF,
    (_S.RUNNING, _E.GAVE_UP): _S.FAILED,
    (_S.CHECKPOINTING, _E.EXITED_OK): _S.SUCCEEDED,
    (_S.CHECKPOINTING, _E.EXITED_RESTART): _S.STARTING,
    (_S.STOPPING, _E.EXITED_RESTART): _S.STARTING,
    (_S.STOPPING, _E.RESTART_DELAYED): _S.BACKOFF,
    (_S.STOPPING, _E.GAVE_UP): _S.FAILED,  # its fault-restart budget is spent
    (_S.STOPPING, _E.EXITED_OK): _S.SUCCEEDED,
    (_S.STOPPING, _E.STOPPED): _S.STOPPED,
    (_S.STOPPING, _E.TERMINATING): _S.STOPPING,  # a stop resumed by a new daemon
    (_S.STOPPING, _E.HAND_OFF): _S.REQUEUEING,
    (_S.REQUEUEING, _E.REQUEUED): _S.REQUEUED,  # final on this node (a rollback is the operator's word, as for any final state)
    (_S.REQUEUEING, _E.HANDOFF_FAILED): _S.STOPPING,  # then on as after any fault stop
    # a rollback stops without a checkpoint: one taken now would be newer than the snapshot asked for
    (_S.RUNNING, _E.ROLLBACK): _S.STOPPING,
    (_S.CHECKPOINTING, _E.ROLLBACK): _S.STOPPING,
    (_S.STOPPING, _E.ROLLBACK): _S.STOPPING,
}
# an operator's stop and a rollback are accepted from every state that is not final
for _state in JobState:
    if _state not in FINAL:
        _MOVES.setdefault((_state, _E.STOP_REQUESTED), _S.STOPPING)
for _state in (_S.BACKOFF, _S.WAITING, *FINAL):
    _MOVES[(_state, _E.ROLLBACK)] = _S.STARTING


class IllegalTransition(ValueError):
    pass


def transition(state: JobState, event: JobEvent) -> JobState:
    """The state after `event`; IllegalTransition for a move nobody planned."""
    try:
        return _MOVES[(state, event)]
    except KeyError:
        raise IllegalTransition(f"job in state {state.value!r} cannot take event {event.value!r}") from None
