"""The daemon's side of control commands: checks that need no running daemon."""

from __future__ import annotations

import os

import pytest

from gpuguard.control.commands import CommandError, PeerCred
from gpuguard.daemon.control import _own_process


def test_attach_takes_only_the_callers_own_process() -> None:
    """The daemon may send the checkpoint signal to what is attached, so a
    non-root caller may attach only its own processes (root: any)."""
    me = PeerCred(pid=os.getpid(), uid=os.getuid(), gid=os.getgid())
    _own_process(str(os.getpid()), me)
    stranger = PeerCred(pid=os.getpid(), uid=os.getuid() + 4242, gid=os.getgid())
    with pytest.raises(CommandError, match=rf"attach: pid {os.getpid()} belongs to uid {os.getuid()}, not to you"):
        _own_process(str(os.getpid()), stranger)
    _own_process("not-a-pid", stranger)  # left to the backend's own clear refusal
