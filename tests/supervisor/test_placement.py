"""placement.free_gpus and pick_gpus: which GPUs a job gets, from facts alone."""

from __future__ import annotations

import pytest

from gpuguard.health.types import GpuState
from gpuguard.supervisor.placement import free_gpus, pick_gpus
from gpuguard.supervisor.ports import GpuFacts

from .fakes import gpu


def node(*states: GpuState) -> dict[str, GpuFacts]:
    """GPUs g0, g1, ... in the given states, listed out of index order on purpose."""
    facts = {f"g{i}": gpu(f"g{i}", i, state) for i, state in enumerate(states)}
    return dict(reversed(facts.items()))


H = GpuState.HEALTHY


def test_free_gpus_are_the_healthy_untaken_ones_in_index_order() -> None:
    assert free_gpus(node(H, H, H, H), taken=set()) == ["g0", "g1", "g2", "g3"]
    assert free_gpus(node(H, H, H, H), taken={"g1"}) == ["g0", "g2", "g3"]


@pytest.mark.parametrize(
    "bad", [GpuState.FAULTED, GpuState.EXCLUDED, GpuState.RESETTING, GpuState.UNKNOWN, GpuState.DEGRADED]
)
def test_a_gpu_that_is_not_healthy_is_never_free(bad: GpuState) -> None:
    assert free_gpus(node(bad, H), taken=set()) == ["g1"]


def test_nothing_free_on_an_empty_or_full_node() -> None:
    assert free_gpus({}, taken=set()) == []
    assert free_gpus(node(H, H), taken={"g0", "g1"}) == []


def test_index_order_not_insertion_order() -> None:
    facts = {"z": gpu("z", 0), "a": gpu("a", 2), "m": gpu("m", 1)}
    assert free_gpus(facts, taken=()) == ["z", "m", "a"]


def test_pick_takes_the_first_free_in_order() -> None:
    assert pick_gpus(["g0", "g1", "g2"], preferred=[], wanted=2, min_gpus=None) == ["g0", "g1"]


def test_pick_keeps_the_previous_gpus_first() -> None:
    """A restarted job stays where it was when those GPUs are still fine."""
    assert pick_gpus(["g0", "g1", "g2"], preferred=["g2"], wanted=1, min_gpus=None) == ["g2"]
    assert pick_gpus(["g0", "g1", "g2"], preferred=["g2", "g1"], wanted=3, min_gpus=None) == ["g2", "g1", "g0"]


def test_a_preferred_gpu_that_is_not_free_is_skipped() -> None:
    """The faulted GPU a job was moved off is in its preference, not in the free list."""
    assert pick_gpus(["g1", "g2"], preferred=["g0", "g2"], wanted=2, min_gpus=None) == ["g2", "g1"]


def test_too_few_free_gpus_means_wait() -> None:
    assert pick_gpus(["g0"], preferred=[], wanted=2, min_gpus=None) is None
    assert pick_gpus([], preferred=["g0"], wanted=1, min_gpus=None) is None


def test_min_gpus_starts_on_fewer() -> None:
    assert pick_gpus(["g0", "g3"], preferred=[], wanted=4, min_gpus=2) == ["g0", "g3"]
    assert pick_gpus(["g0", "g3"], preferred=["g3"], wanted=4, min_gpus=1) == ["g3", "g0"]
    assert pick_gpus(["g0"], preferred=[], wanted=4, min_gpus=2) is None


def test_min_gpus_never_takes_more_than_wanted() -> None:
    assert pick_gpus(["g0", "g1", "g2"], preferred=[], wanted=2, min_gpus=1) == ["g0", "g1"]


def test_faulted_and_excluded_never_picked_end_to_end() -> None:
    """free_gpus feeds pick_gpus: the bad GPUs a job held do not come back."""
    facts = node(GpuState.FAULTED, GpuState.EXCLUDED, H, H)
    picked = pick_gpus(free_gpus(facts, taken=set()), preferred=["g0", "g1"], wanted=2, min_gpus=None)
    assert picked == ["g2", "g3"]
    assert pick_gpus(free_gpus(facts, taken={"g3"}), preferred=["g0", "g1"], wanted=2, min_gpus=None) is None
    assert pick_gpus(free_gpus(facts, taken={"g3"}), preferred=["g0", "g1"], wanted=2, min_gpus=1) == ["g2"]
