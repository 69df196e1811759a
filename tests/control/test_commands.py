from __future__ import annotations

import grp
from typing import Any

import pytest

from gpuguard.control.commands import COMMANDS, MAX_EVENTS, CommandError, PeerCred, dispatch
from gpuguard.control.protocol import ProtocolError, Request

from . import FakeController

ROOT = PeerCred(pid=10, uid=0, gid=0)
USER = PeerCred(pid=11, uid=1000, gid=1000, groups=(1000, 27))
READING = {"status", "events", "check", "healthy", "snapshots"}
CHANGING = {"exclude", "include", "reset", "inject", "run", "stop", "rollback"}


def test_registry_has_every_contract_command_with_help() -> None:
    assert set(COMMANDS) == READING | CHANGING
    for name, command in COMMANDS.items():
        assert command.name == name and command.help
        assert command.mutating == (name in CHANGING)


def test_reading_commands_are_for_anyone() -> None:
    fake = FakeController()
    assert dispatch(fake, Request("events", {"limit": 1, "job": "train"}), USER, admin_gid=999)[0]["job"] == "train"
    assert fake.calls == [("events", (1, None, "train"), None)]


class EventsFake(FakeController):
    """The shared fake, with the filters `events` passes when asked for."""

    def events(  # type: ignore[override]
        self, limit: int, gpu: str | None, job: str | None, *, since_id: int | None = None, since_ts: float | None = None
    ) -> list[dict[str, Any]]:
        self._record("events", limit, gpu, job, since_id, since_ts)
        return []


def test_events_defaults_to_a_bounded_limit_and_reads_since_as_utc() -> None:
    fake = EventsFake()
    dispatch(fake, Request("events"), USER, admin_gid=None)
    dispatch(fake, Request("events", {"since_id": 41, "since": "2025-01-31T13:00:00+01:00"}), USER, admin_gid=None)
    assert [c[1] for c in fake.calls] == [(MAX_EVENTS, None, None, None, None), (MAX_EVENTS, None, None, 41, 1738324800.0)]


def test_changing_commands_need_root_or_the_admin_group() -> None:
    fake = FakeController()
    gid = grp.getgrnam("nogroup").gr_gid
    with pytest.raises(CommandError) as info:
        dispatch(fake, Request("exclude", {"gpu": "0"}), USER, admin_gid=gid)
    assert info.value.code == "refused"
    assert str(info.value) == "permission denied: exclude needs root or group nogroup"
    assert fake.calls == []
    member = PeerCred(pid=12, uid=1000, gid=1000, groups=(1000, gid))
    assert dispatch(fake, Request("exclude", {"gpu": "0"}), member, admin_gid=gid)["state"] == "excluded"
    assert dispatch(fake, Request("include", {"gpu": "0"}), ROOT, admin_gid=None)["changed"] is True
    with pytest.raises(CommandError, match="needs root$"):
        dispatch(fake, Request("stop", {"name": "train"}), USER, admin_gid=None)


def test_unknown_command() -> None:
    with pytest.raises(ProtocolError, match="unknown command 'frobnicate'"):
        dispatch(FakeController(), Request("frobnicate"), ROOT, admin_gid=None)


@pytest.mark.parametrize(
    ("cmd", "args", "message"),
    [
        ("events", {"limit": "5"}, "'limit' must be an integer"),
        ("events", {"limit": True}, "'limit' must be an integer"),
        ("events", {"limit": -1}, "'limit' must be between 0 and 100000"),
        ("events", {"until": 3}, "unknown argument"),
        ("events", {"since": 3}, "'since' must be a string"),
        ("events", {"since": "yesterday"}, "'since' must be an ISO-8601 time"),
        ("events", {"since": "2025-01-31T12:00:00"}, "with a UTC offset"),
        ("events", {"since_id": -1}, "'since_id' must be between 0 and"),
        ("exclude", {}, "'gpu' is required"),
        ("exclude", {"gpu": 0}, "'gpu' must be a string"),
        ("run", {"name": "x", "command": []}, "'command' must not be empty"),
        ("run", {"name": "x", "command": ["a", 1]}, "must be a list of strings"),
        ("run", {"name": "x", "command": ["a"], "gpus": 0}, "'gpus' must be between 1 and 1024"),
        ("run", {"name": "x", "command": ["a"], "env": {"A": 1}}, "must be an object of strings"),
        ("run", {"name": "", "command": ["a"]}, "'name' must not be empty"),
    ],
)
def test_argument_schema(cmd: str, args: dict[str, Any], message: str) -> None:
    fake = FakeController()
    with pytest.raises(ProtocolError, match=message):
        dispatch(fake, Request(cmd, args), ROOT, admin_gid=None)
    assert fake.calls == []


def test_run_gets_every_spec_key_with_defaults() -> None:
    fake = FakeController()
    dispatch(fake, Request("run", {"name": "train", "command": ["python", "t.py"]}), ROOT, admin_gid=None)
    (name, (spec,), peer) = fake.calls[0]
    assert (name, peer) == ("run", ROOT)
    assert spec == {
        "name": "train",
        "command": ["python", "t.py"],
        "gpus": 1,
        "min_gpus": None,
        "checkpoint": None,
        "workdir": None,
        "max_restarts": None,
        "env": {},
        "standby": False,
    }


def test_command_error_codes() -> None:
    with pytest.raises(ValueError):
        CommandError("x", code="nonsense")
    assert CommandError("gone", code="not_found").code == "not_found"
