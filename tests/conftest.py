"""Fixtures every test may use by name (pytest finds them here); the helpers they are
built on live in tests/harness.py."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import NOBODY_ENV, DaemonProc, as_nobody, running_daemon


@pytest.fixture(scope="module")
def nobody_python() -> str:
    """An interpreter nobody may run that imports gpuguard's client side."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as nobody")
    system = shutil.which("python3", path=NOBODY_ENV["PATH"]) or ""
    for exe in dict.fromkeys([sys.executable, os.path.realpath(sys.executable), system]):
        try:
            if exe and as_nobody([exe, "-c", "import gpuguard.ctl, gpuguard.control.client"]).returncode == 0:
                return exe
        except OSError:
            continue
    pytest.skip("no Python interpreter that user nobody may run")


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory nobody can reach (pytest's tmp_path sits under a 0700 one)."""
    path = Path(tempfile.mkdtemp(prefix="gpuguard-open-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProc]:
    """A started `gpuguardd --simulate 2` under tmp_path, stopped at the end; a test that
    needs another configuration uses harness.running_daemon itself."""
    with running_daemon(tmp_path) as proc:
        yield proc


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Markers that follow from the fixtures a test asks for, even where its module does not
    say so: this file's `daemon` starts a real gpuguardd (`e2e`); acting as another user
    (nobody_python) and making cgroups (tests/supervisor's needs_cgroup) need root (`root`)."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if {"nobody_python", "needs_cgroup"} & names:
            item.add_marker(pytest.mark.root)
        if "daemon" in names:
            defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {}).get("daemon", ())
            if defs and defs[-1].baseid == "tests":  # this file's, not a module's own `daemon`
                item.add_marker(pytest.mark.e2e)
