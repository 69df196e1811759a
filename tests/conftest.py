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

from harness import NOBODY_ENV, DaemonProc, as_nobody


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
    proc = DaemonProc(tmp_path)
    proc.start()
    yield proc
    proc.stop()
