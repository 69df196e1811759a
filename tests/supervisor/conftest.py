"""Fixtures of the supervisor tests (tests/conftest.py has the ones every test may use)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import psutil
import pytest

from gpuguard.supervisor import cgroup
from gpuguard.supervisor import runner as runner_mod
from gpuguard.supervisor import supervisor as supervisor_mod

from .fakes import MoveLog, Node, SpyLog, kill_started

N = TypeVar("N", bound=Node)


@pytest.fixture
def needs_cgroup(tmp_path: Path) -> None:
    """Skip unless this process can make a job cgroup (a writable cgroup v2 holds its own cgroup)."""
    probe = cgroup.create("probe", tmp_path / "probe-status")
    if probe is None:
        pytest.skip("no writable cgroup v2 hierarchy")
    probe.remove()


@pytest.fixture
def moves(monkeypatch: pytest.MonkeyPatch) -> MoveLog:
    """Every state move the runner makes, checked against the table (illegal ones kept)."""
    log = MoveLog()
    monkeypatch.setattr(runner_mod, "transition", log)
    return log


@pytest.fixture
def watched(monkeypatch: pytest.MonkeyPatch, moves: MoveLog) -> Iterator[Callable[[N], N]]:
    """Hand it a fake node (fakes.Node or a subclass): at teardown the node is released, no
    process the test started is left, no move was illegal and no tick swallowed an exception."""
    # a subreaper flag would outlive the test in the pytest process; these jobs leave no orphans
    monkeypatch.setattr(supervisor_mod, "become_subreaper", lambda: False)
    spy = SpyLog(supervisor_mod.log)
    monkeypatch.setattr(supervisor_mod, "log", spy)
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    nodes: list[Node] = []

    def watch(node: N) -> N:
        nodes.append(node)
        return node

    yield watch
    for node in nodes:
        node.release()
    kill_started(me, before)
    for node in nodes:
        for sup in node.supervisors:
            for job in list(sup.jobs.values()):
                if job.rt.stopping is not None:
                    job.rt.stopping.join(5)
            sup.close()
    assert moves.illegal == [], f"illegal state moves: {moves.illegal}"
    assert spy.exceptions == [], "tick swallowed an exception:\n" + "\n".join(spy.exceptions)
