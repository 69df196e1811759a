"""Changing commands from a peer that is neither root nor in the admin group.

The tests run as root, so the client runs as `nobody` in a subprocess, with
an interpreter that `nobody` may execute (the venv's may sit under /root)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import NOBODY, as_nobody

from . import FakeController, serving

pytestmark = pytest.mark.root

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


def client_as_nobody(python: str, socket_path: Path) -> dict[str, object]:
    done = as_nobody([python, "-c", CLIENT, str(socket_path)])
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_stranger_may_read_but_not_change(nobody_python: str, open_dir: Path) -> None:
    fake = FakeController()
    with serving(open_dir, fake, admin_gid=0, mode=0o666) as (_, path):
        out = client_as_nobody(nobody_python, path)
    assert out == {"check": "healthy", "exclude": ["refused", "permission denied: exclude needs root or group root"]}
    assert [c[0] for c in fake.calls] == ["check"]


def test_a_member_of_the_admin_group_may_change(nobody_python: str, open_dir: Path) -> None:
    fake = FakeController()
    with serving(open_dir, fake, admin_gid=NOBODY.pw_gid, mode=0o666) as (_, path):
        out = client_as_nobody(nobody_python, path)
    assert out == {"check": "healthy", "exclude": "excluded"}
    peer = fake.calls[-1][2]
    assert peer is not None and (peer.uid, peer.gid) == (NOBODY.pw_uid, NOBODY.pw_gid)
