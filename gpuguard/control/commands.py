"""The control commands, one small class each (after circus/commands).

A command holds its wire name, whether it changes anything (`mutating`: only
root and the admin group may run those), its argument schema, its one-line
help and its daemon side, which calls the `Controller` the daemon implements.
`dispatch` is the whole server-side path from a decoded request to a result.

Every argument is validated here, at the door, by full match and within
bounds, before the controller sees it (so nothing is created on disk for a bad
request); the `bad_request` reply names the field.
"""

from __future__ import annotations

import abc
import grp
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Protocol

from gpuguard.control import validation
from gpuguard.control.protocol import ProtocolError, Request


@dataclass(frozen=True, slots=True)
class PeerCred:
    """Who is on the other end of a connection (SO_PEERCRED plus groups)."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or gid in self.groups


class CommandError(Exception):
    """The daemon refuses or fails a command; `code` goes on the wire."""

    CODES = ("bad_request", "refused", "not_found", "failed")

    def __init__(self, message: str, code: str = "failed") -> None:
        if code not in self.CODES:
            raise ValueError(f"unknown CommandError code {code!r}")
        super().__init__(message)
        self.message = message
        self.code = code


class Controller(Protocol):
    """The daemon's side of every command. `gpu` is as the user typed it
    (index or UUID); the daemon resolves it. Raise CommandError to refuse."""

    def status(self) -> dict[str, Any]: ...

    def events(
        self, limit: int, gpu: str | None, job: str | None, *, since_id: int | None = None, since_ts: float | None = None
    ) -> list[dict[str, Any]]:
        """The newest `limit` matching events after event `since_id` and at
        or after `since_ts` (seconds since the epoch), ordered by time."""
        ...

    def check(self) -> dict[str, Any]: ...

    def healthy(self) -> list[dict[str, Any]]: ...

    def snapshots(self, name: str) -> list[dict[str, Any]]: ...

    def exclude(self, gpu: str, reason: str | None, peer: PeerCred) -> dict[str, Any]: ...

    def include(self, gpu: str, peer: PeerCred) -> dict[str, Any]: ...

    def reset(self, gpu: str, peer: PeerCred) -> dict[str, Any]: ...

    def inject(self, gpu: str, fault: str, value: str | None, peer: PeerCred) -> dict[str, Any]: ...

    def run(self, spec: dict[str, Any], peer: PeerCred) -> dict[str, Any]: ...

    def stop(self, name: str, peer: PeerCred) -> dict[str, Any]: ...

    def rollback(self, name: str, snapshot: str | None, peer: PeerCred) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Arg:
    """One argument: `kind` is str, int, bool, list (of str) or dict (str to str);
    an int lies within [minimum, maximum]; `valid` checks what the kind cannot."""

    name: str
    kind: type
    required: bool = False
    minimum: int = 0
    maximum: int = 2**31 - 1
    default: Any = None
    valid: validation.Validator | None = None

    def check(self, value: Any, cmd: str) -> Any:
        where = f"{cmd}: argument '{self.name}'"
        if value is None:
            if self.required:
                raise ProtocolError(f"{where} is required")
            return dict(self.default) if isinstance(self.default, dict) else self.default
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ProtocolError(f"{where} must be true or false")
            return value
        if self.kind is int:
            if not isinstance(value, int) or isinstance(value, bool):
                raise ProtocolError(f"{where} must be an integer")
            if not self.minimum <= value <= self.maximum:
                raise ProtocolError(f"{where} must be between {self.minimum} and {self.maximum}")
            return value
        if self.kind is str:
            if not isinstance(value, str):
                raise ProtocolError(f"{where} must be a string")
        elif self.kind is list:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ProtocolError(f"{where} must be a list of strings")
        elif self.kind is dict:
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise ProtocolError(f"{where} must be an object of strings")
        if self.required and not value:
            raise ProtocolError(f"{where} must not be empty")
        problem = validation.text_problem(value) or (self.valid(value) if self.valid is not None else None)
        if problem:
            raise ProtocolError(f"{where} {problem}")
        return value


MAX_GPUS = 1024
MAX_RESTARTS = 10_000
MAX_EVENTS = 100_000
GPU_ARG = Arg("gpu", str, required=True, valid=validation.gpu)
JOB = Arg("name", str, required=True, valid=validation.job_name)


class Command(abc.ABC):
    name: ClassVar[str]
    help: ClassVar[str]
    mutating: ClassVar[bool] = False
    args: ClassVar[tuple[Arg, ...]] = ()

    def validate(self, args: dict[str, Any]) -> dict[str, Any]:
        """The arguments checked against the schema, every declared one present."""
        known = {a.name for a in self.args}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ProtocolError(f"{self.name}: unknown argument(s): {', '.join(unknown)}")
        return {a.name: a.check(args.get(a.name), self.name) for a in self.args}

    @abc.abstractmethod
    def execute(self, controller: Controller, args: dict[str, Any], peer: PeerCred) -> Any:
        """The daemon side: call the controller with the validated arguments."""


class Status(Command):
    name = "status"
    help = "GPUs, their health and metrics, jobs, daemon info"

    def execute(self, controller: Controller, args: dict[str, Any], peer: PeerCred) -> Any:
        return controller.status()


class Events(Command):
    name = "events"
    help = "the event history, oldest first, newest last"
    args = (
        Arg("limit", int, maximum=MAX_EVENTS, default=MAX_EVENTS),
        Arg("gpu", str, valid=validation.gpu),
        Arg("job", str, valid=validation.job_name),
        Arg("since_id", int, maximum=2**63 - 1),
        Arg("since", str, valid=validation.iso_time),
    )

    def execute(self, controller: Controller, args: dict[str, Any], peer: PeerCred) -> Any:
        since_ts = datetime.fromisoformat(args["since"]).timestamp() if args["since"] else None
        # the filters go only when asked for: a controller of the plain query still answers it
        since: dict[str, Any] = {k: v for k, v in (("since_id", args["since_id"]), ("since_ts", since_ts)) if v is not None}
        return controller.events(args["limit"], args["gpu"], args["job"], **since)


class Check(Command):
    name = "check"
    help = "one line; exit 0 healthy, 1 unhealthy, 2 unknown"

    def execute(self, controller: Controller, args: dict[str, Any], peer: PeerCred) -> Any:
        return controller.check()


class Healthy(Command):
    name = "healthy"
    help = "the GPUs a scheduler may use now, one line"

    def execute(self, controller: Controller, args: dict[str, Any], peer: PeerCred) -> Any:
        return controller.healthy()


class Snapshots(Command):
    name = "snapshots"
    help = "the job's validated checkpoint snapshots, newest first"
    args = (JOB,)

    def execute(self, controller: Controller, args: dict[str, Any], peer: PeerCred) -> Any:
        return controller.snapshots(args["name"])


class Exclude(Command):
    name = "exclude"
    help = "quarantine a GPU (persists across restarts)"
    mutating = True
    args = (GPU_ARG, Arg("reason", str, valid=validation.one_line))

    def execute(self, controller: Controller, args: dict[str, Any], peer: PeerCred) -> Any:
        return controller.exclude(args["gpu"], args["reason"], peer)


class Include(Command):
    name = "include"
    help = "return a quarantined GPU to service"
    mutating = True
    args = (GPU_ARG,)

    def execute(self, controller: Controller, args: dict[str, Any], peer: PeerCred) -> Any:
        return controller.include(args["gpu"], peer)


class Reset(Command):
    name = "reset"
    help = "try a GPU reset now"
    mutating = True
    args = (GPU_ARG,)

    def execute(self, controller: Controller, args: dict[str, Any], peer: PeerCred) -> Any:
        return controller.reset(args["gpu"], peer)


class Inject(Command):
    name = "inject"
    help = (
        "simulated GPUs only: inject a fault (xid CODE, ecc-dbe, ecc-sbe COUNT, hang, lost, remap-pending, thermal CELSIUS)"
        " or list a process on the GPU (attach PID, detach PID)"
    )
    mutating = True
    args = (
        GPU_ARG,
        Arg("fault", str, required=True, valid=validation.fault),
        Arg("value", str, valid=validation.fault_value),
    )

    def execute(self, controller: Controller, args: dict[str, Any], peer: PeerCred) -> Any:
        return controller.inject(args["gpu"], args["fault"], args["value"], peer)


class Run(Command):
    name = "run"
    help = "start a managed job"
    mutating = True
    args = (
        JOB,
        Arg("command", list, required=True, valid=validation.argv),
        Arg("gpus", int, minimum=1, maximum=MAX_GPUS, default=1),
        Arg("min_gpus", int, minimum=1, maximum=MAX_GPUS),
        Arg("checkpoint", str, valid=validation.path(absolute=False)),
        Arg("workdir", str, valid=validation.path(absolute=True)),
        Arg("max_restarts", int, maximum=MAX_RESTARTS),
        Arg("env", dict, default={}, valid=validation.environment),
        Arg("standby", bool, default=False),
    )

    def validate(self, args: dict[str, Any]) -> dict[str, Any]:
        """The schema, and `min_gpus` no more than `gpus`."""
        checked = super().validate(args)
        if checked["min_gpus"] is not None and checked["min_gpus"] > checked["gpus"]:
            raise ProtocolError(f"{self.name}: argument 'min_gpus' must not exceed 'gpus' ({checked['gpus']})")
        return checked

    def execute(self, controller: Controller, args: dict[str, Any], peer: PeerCred) -> Any:
        return controller.run(args, peer)


class Stop(Command):
    name = "stop"
    help = "stop a job and everything it started; its GPUs are freed"
    mutating = True
    args = (JOB,)

    def execute(self, controller: Controller, args: dict[str, Any], peer: PeerCred) -> Any:
        return controller.stop(args["name"], peer)


class Rollback(Command):
    name = "rollback"
    help = "restart a job from an older snapshot (default: the one before the newest)"
    mutating = True
    args = (JOB, Arg("snapshot", str, valid=validation.snapshot_id))

    def execute(self, controller: Controller, args: dict[str, Any], peer: PeerCred) -> Any:
        return controller.rollback(args["name"], args["snapshot"], peer)


COMMANDS: dict[str, Command] = {
    c.name: c()
    for c in (Status, Events, Check, Healthy, Snapshots, Exclude, Include, Reset, Inject, Run, Stop, Rollback)
}


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def dispatch(controller: Controller, request: Request, peer: PeerCred, admin_gid: int | None) -> Any:
    """Look up, authorise, validate and run one request.

    Raises ProtocolError (bad_request) or CommandError; anything else the
    controller raises is the caller's to report as internal."""
    command = COMMANDS.get(request.cmd)
    if command is None:
        raise ProtocolError(f"unknown command {request.cmd!r}")
    if command.mutating and not (peer.uid == 0 or (admin_gid is not None and peer.in_group(admin_gid))):
        needs = f"root or group {group_name(admin_gid)}" if admin_gid is not None else "root"
        raise CommandError(f"permission denied: {command.name} needs {needs}", code="refused")
    return command.execute(controller, command.validate(request.args), peer)
