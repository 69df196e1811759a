"""states.transition: the legal moves of a job, and refusal of the rest."""

from __future__ import annotations

import pytest

from gpuguard.supervisor.states import ACTIVE, FINAL, IllegalTransition, JobEvent, JobState, transition

S, E = JobState, JobEvent

# a fault's path: run, checkpoint, stop, start again; a crash's; the end states
LEGAL = [
    (S.STARTING, E.SPAWNED, S.RUNNING),
    (S.STARTING, E.SPAWN_FAILED, S.FAILED),
    (S.STARTING, E.ADOPTED, S.RUNNING),
    (S.STARTING, E.NO_GPUS, S.WAITING),
    (S.WAITING, E.GPUS_FREE, S.STARTING),
    (S.RUNNING, E.FAULT, S.CHECKPOINTING),
    (S.RUNNING, E.HANG, S.CHECKPOINTING),
    (S.CHECKPOINTING, E.TERMINATING, S.STOPPING),
    (S.CHECKPOINTING, E.EXITED_RESTART, S.STARTING),
    (S.CHECKPOINTING, E.EXITED_OK, S.SUCCEEDED),
    (S.STOPPING, E.EXITED_RESTART, S.STARTING),
    (S.STOPPING, E.RESTART_DELAYED, S.BACKOFF),
    (S.STOPPING, E.GAVE_UP, S.FAILED),
    (S.STOPPING, E.STOPPED, S.STOPPED),
    (S.RUNNING, E.EXITED_OK, S.SUCCEEDED),
    (S.RUNNING, E.EXITED_RESTART, S.STARTING),
    (S.RUNNING, E.CRASHED, S.BACKOFF),
    (S.RUNNING, E.RESTART_REQUESTED, S.BACKOFF),
    (S.RUNNING, E.GAVE_UP, S.FAILED),
    (S.BACKOFF, E.BACKOFF_OVER, S.STARTING),
    (S.RUNNING, E.ROLLBACK, S.STOPPING),
    (S.CHECKPOINTING, E.ROLLBACK, S.STOPPING),
    (S.STOPPING, E.TERMINATING, S.STOPPING),
    (S.FAILED, E.ROLLBACK, S.STARTING),
    (S.STOPPED, E.ROLLBACK, S.STARTING),
    (S.WAITING, E.ROLLBACK, S.STARTING),
]


@pytest.mark.parametrize(("state", "event", "after"), LEGAL)
def test_legal_moves(state: JobState, event: JobEvent, after: JobState) -> None:
    assert transition(state, event) == after


@pytest.mark.parametrize("state", sorted(set(JobState) - FINAL))
def test_an_operator_stop_is_taken_in_every_live_state(state: JobState) -> None:
    assert transition(state, E.STOP_REQUESTED) == S.STOPPING


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (S.SUCCEEDED, E.SPAWNED),
        (S.FAILED, E.BACKOFF_OVER),
        (S.STOPPED, E.STOP_REQUESTED),
        (S.SUCCEEDED, E.STOP_REQUESTED),
        (S.BACKOFF, E.FAULT),  # no process: nothing to checkpoint
        (S.WAITING, E.CRASHED),
        (S.STARTING, E.EXITED_OK),
        (S.RUNNING, E.GPUS_FREE),
        (S.STOPPING, E.FAULT),
        (S.CHECKPOINTING, E.CRASHED),
    ],
)
def test_illegal_moves_are_refused(state: JobState, event: JobEvent) -> None:
    with pytest.raises(IllegalTransition, match=f"{state.value!r} cannot take event {event.value!r}"):
        transition(state, event)


def test_final_states_leave_only_by_rollback() -> None:
    for state in FINAL:
        for event in JobEvent:
            if event == E.ROLLBACK:
                assert transition(state, event) == S.STARTING
            else:
                with pytest.raises(IllegalTransition):
                    transition(state, event)


def test_active_and_final_do_not_overlap() -> None:
    assert not ACTIVE & FINAL
    assert S.BACKOFF not in ACTIVE | FINAL and S.WAITING not in ACTIVE | FINAL
