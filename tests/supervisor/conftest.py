"""Fixtures of the supervisor tests (tests/conftest.py has the ones every test may use)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuguard.supervisor import cgroup


@pytest.fixture
def needs_cgroup(tmp_path: Path) -> None:
    """Skip unless this process can make a job cgroup (a writable cgroup v2 holds its own cgroup)."""
    probe = cgroup.create("probe", tmp_path / "probe-status")
    if probe is None:
        pytest.skip("no writable cgroup v2 hierarchy")
    probe.remove()
