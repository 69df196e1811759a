"""Changing commands from a peer that is neither root nor in the admin group.

The tests run as root, so the client runs as `nobody` in a subprocess, with
an interpreter that `nobody` may execute (the venv's may sit under /root)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import gpuguard

from . import FakeController, serving

REPO = Path(gpuguard.__file__).resolve().parent.parent
ENV = {"PYTHONPATH": str(REPO), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
NOBODY = pwd.getpwnam("nobody")
CLIENT = """
import json, sys
from gpuguard.control.client import CommandFailed, request
out = {"check": request(sys.argv[1], "check", {})["status"]}
try:
    out["exclude"] = request(sys.argv[1], "exclude", {"gpu": "0"})["state"]
except CommandFailed as exc:
    out["exclude"] = [exc.code, exc.message]
print(json.dumps(out))
"""


def _runs_as_nobody(exe: str) -> bool:
    try:
        probe = subprocess.run(
            [exe, "-c", "import gpuguard.control.client"], user="nobody", group=NOBODY.pw_gid, extra_groups=[], env=ENV, cwd="/", capture_output=True, timeout=30
        )
    except OSError:
        return False
    return probe.returncode == 0


@pytest.fixture(scope="module")
def nobody_python() -> str:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as nobody")
    candidates = dict.fromkeys([sys.executable, os.path.realpath(sys.executable), shutil.which("python3", path=ENV["PATH"]) or ""])
    for exe in candidates:
        if exe and _runs_as_nobody(exe):
            return exe
    pytest.skip("no Python interpreter that user nobody may run")


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory nobody can reach (pytest's tmp_path sits under a 0700 one)."""
    path = Path(tempfile.mkdtemp(prefix="gpuguard-control-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def as_nobody(python: str, socket_path: Path) -> dict[str, object]:
    done = subprocess.run(
        [python, "-c", CLIENT, str(socket_path)], user="nobody", group=NOBODY.pw_gid, extra_groups=[], env=ENV, cwd="/", capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_stranger_may_read_but_not_change(nobody_python: str, open_dir: Path) -> None:
    fake = FakeController()
    with serving(open_dir, fake, admin_gid=0, mode=0o666) as (_, path):
        out = as_nobody(nobody_python, path)
    assert out == {"check": "healthy", "exclude": ["refused", "permission denied: exclude needs root or group root"]}
    assert [c[0] for c in fake.calls] == ["check"]


def test_a_member_of_the_admin_group_may_change(nobody_python: str, open_dir: Path) -> None:
    fake = FakeController()
    with serving(open_dir, fake, admin_gid=NOBODY.pw_gid, mode=0o666) as (_, path):
        out = as_nobody(nobody_python, path)
    assert out == {"check": "healthy", "exclude": "excluded"}
    peer = fake.calls[-1][2]
    assert peer is not None and (peer.uid, peer.gid) == (NOBODY.pw_uid, NOBODY.pw_gid)
