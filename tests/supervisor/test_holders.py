"""holders.to_judge: which processes on faulted GPUs get judged, and when again."""

from __future__ import annotations

import pytest

from gpuguard.health.types import GpuState
from gpuguard.supervisor.holders import to_judge
from gpuguard.supervisor.ports import GpuFacts

from .fakes import gpu

F, H = GpuState.FAULTED, GpuState.HEALTHY


def facts(*gpus: GpuFacts) -> dict[str, GpuFacts]:
    return {g.uuid: g for g in gpus}


def pairs(todo: list[tuple[GpuFacts, int]]) -> list[tuple[str, int]]:
    return [(g.uuid, pid) for g, pid in todo]


def test_holders_of_a_faulted_gpu_are_judged() -> None:
    now = facts(gpu("a", 0, F, holders=(10, 11)), gpu("b", 1, H, holders=(20,)))
    kept, todo = to_judge(now, ours=set(), judged=set())
    assert pairs(todo) == [("a", 10), ("a", 11)]
    assert kept == set()


@pytest.mark.parametrize("health", [GpuState.HEALTHY, GpuState.DEGRADED, GpuState.UNKNOWN, GpuState.RESETTING, None])
def test_only_faulted_health_counts(health: GpuState | None) -> None:
    _, todo = to_judge(facts(gpu("a", 0, H, holders=(10,), health=health)), ours=set(), judged=set())
    assert todo == []


def test_health_not_the_effective_state_decides() -> None:
    """A faulted GPU the pool has excluded since is still faulted: its holders are judged.
    An operator's exclusion of a healthy GPU is no fault."""
    excluded_faulty = gpu("a", 0, GpuState.EXCLUDED, holders=(10,), health=F)
    excluded_healthy = gpu("b", 1, GpuState.EXCLUDED, holders=(20,), health=H)
    _, todo = to_judge(facts(excluded_faulty, excluded_healthy), ours=set(), judged=set())
    assert pairs(todo) == [("a", 10)]


def test_our_own_processes_are_left_out() -> None:
    _, todo = to_judge(facts(gpu("a", 0, F, holders=(10, 11, 12))), ours={11, 99}, judged=set())
    assert pairs(todo) == [("a", 10), ("a", 12)]


def test_a_holder_is_judged_once_per_fault() -> None:
    now = facts(gpu("a", 0, F, holders=(10, 11)))
    kept, todo = to_judge(now, ours=set(), judged={("a", 10)})
    assert pairs(todo) == [("a", 11)]
    assert kept == {("a", 10)}
    kept, todo = to_judge(now, ours=set(), judged=kept | {("a", 11)})
    assert todo == [] and kept == {("a", 10), ("a", 11)}


def test_a_holder_on_two_faulted_gpus_is_judged_for_each() -> None:
    now = facts(gpu("a", 0, F, holders=(10,)), gpu("b", 1, F, holders=(10,)))
    kept, todo = to_judge(now, ours=set(), judged={("a", 10)})
    assert pairs(todo) == [("b", 10)]


def test_recovery_forgets_and_a_new_fault_asks_again() -> None:
    judged = {("a", 10)}
    kept, todo = to_judge(facts(gpu("a", 0, H, holders=(10,))), ours=set(), judged=judged)
    assert kept == set() and todo == []
    kept, todo = to_judge(facts(gpu("a", 0, F, holders=(10,))), ours=set(), judged=kept)
    assert pairs(todo) == [("a", 10)]


def test_a_gpu_gone_from_the_facts_is_forgotten() -> None:
    kept, _ = to_judge(facts(gpu("b", 1, F)), ours=set(), judged={("a", 10)})
    assert kept == set()


def test_the_judged_set_given_is_not_changed() -> None:
    judged = {("a", 10), ("b", 20)}
    to_judge(facts(gpu("a", 0, F, holders=(10,))), ours=set(), judged=judged)
    assert judged == {("a", 10), ("b", 20)}


def test_a_faulted_gpu_nobody_holds_asks_nothing() -> None:
    assert to_judge(facts(gpu("a", 0, F)), ours=set(), judged=set()) == (set(), [])
