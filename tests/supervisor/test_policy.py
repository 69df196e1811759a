"""policy.decide and backoff_s: what a job does about the GPUs under it."""

from __future__ import annotations

import pytest

from gpuguard.health.types import Action, GpuState
from gpuguard.supervisor.ports import GpuFacts
from gpuguard.supervisor.policy import Reaction, app_xid_key, backoff_s, decide

NONE: frozenset[tuple[object, ...]] = frozenset()


def view(uuid: str, state: GpuState = GpuState.HEALTHY, action: Action = Action.NONE, **kw: object) -> GpuFacts:
    return GpuFacts(uuid, state, action, kw.pop("reason", None), **kw)  # type: ignore[arg-type]


def test_healthy_gpus_call_for_nothing() -> None:
    assert decide([view("a"), view("b")], migrate_on_degraded=True, handled=NONE) is None
    assert decide([], migrate_on_degraded=True, handled=NONE) is None


@pytest.mark.parametrize(
    ("action", "reset", "node_hook"),
    [(Action.RESET_GPU, True, False), (Action.REBOOT_NODE, False, True), (Action.INSPECT, False, False)],
)
def test_a_faulted_gpu_moves_the_job_and_leaves_the_pool(action: Action, reset: bool, node_hook: bool) -> None:
    d = decide([view("a"), view("b", GpuState.FAULTED, action, reason="Xid 95")], migrate_on_degraded=True, handled=NONE)
    assert d is not None
    assert (d.reaction, d.gpu, d.reason, d.exclude, d.reset, d.node_hook) == (Reaction.MOVE, "b", "Xid 95", True, reset, node_hook)
    assert d.key == ("faulted", "b")


@pytest.mark.parametrize("state", [GpuState.EXCLUDED, GpuState.RESETTING])
def test_an_excluded_or_resetting_gpu_moves_the_job_without_excluding_again(state: GpuState) -> None:
    d = decide([view("a", state)], migrate_on_degraded=False, handled=NONE)
    assert d is not None and d.reaction == Reaction.MOVE and not d.exclude and not d.reset
    assert d.reason == state.value  # no reason given: the state names it


def test_restart_the_app_xids_restart_on_the_same_gpu_once_per_xid() -> None:
    gpu = view("a", app_xids=((13, 100.0), (31, 105.0), (13, 101.0)), reason="graphics exception")
    d = decide([gpu], migrate_on_degraded=True, handled=NONE)
    assert d is not None and d.reaction == Reaction.RESTART_SAME and not d.exclude
    assert d.reason == "Xid 13, 31: graphics exception"
    assert d.key == app_xid_key(gpu) == ("app_xid", "a", 105.0)
    assert decide([gpu], migrate_on_degraded=True, handled=frozenset({d.key})) is None
    newer = view("a", app_xids=((13, 100.0), (13, 200.0)))
    again = decide([newer], migrate_on_degraded=True, handled=frozenset({d.key}))
    assert again is not None and again.key == ("app_xid", "a", 200.0)


def test_app_xid_key_is_none_without_app_xids() -> None:
    assert app_xid_key(view("a")) is None


def test_degraded_migrates_only_when_asked() -> None:
    gpus = [view("a", GpuState.DEGRADED, reason="hot")]
    assert decide(gpus, migrate_on_degraded=False, handled=NONE) is None
    d = decide(gpus, migrate_on_degraded=True, handled=NONE)
    assert d is not None and d.reaction == Reaction.MIGRATE and d.key == ("degraded", "a") and not d.exclude


def test_the_strongest_reaction_wins_and_handled_ones_step_aside() -> None:
    gpus = [
        view("deg", GpuState.DEGRADED),
        view("app", app_xids=((13, 1.0),)),
        view("exc", GpuState.EXCLUDED),
        view("bad", GpuState.FAULTED, Action.RESET_GPU),
    ]
    order = []
    handled: set[tuple[object, ...]] = set()
    while (d := decide(gpus, migrate_on_degraded=True, handled=frozenset(handled))) is not None:
        order.append(d.gpu)
        handled.add(d.key)
    assert order == ["bad", "exc", "app", "deg"]


@pytest.mark.parametrize(
    ("crashes", "expected"),
    [(-1, 0.0), (0, 0.0), (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (30, 1.0)],
)
def test_backoff_doubles_up_to_the_cap(crashes: int, expected: float) -> None:
    assert backoff_s(crashes, 0.2, 1.0) == pytest.approx(expected)
