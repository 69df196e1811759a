"""Where the daemon is, and what each command sends it."""

from __future__ import annotations

import argparse
import os
import re
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gpuguard import contract
from gpuguard.ctl.common import UsageError

# What `run` never sends from this shell's environment: variables that name
# this login session's agents, display, bus and credentials. A job outlives
# the session and runs under the daemon; it must not borrow (or leak) them.
SESSION_ENV = (
    "SSH_AUTH_SOCK", "SSH_AGENT_PID", "SSH_CONNECTION", "SSH_CLIENT", "SSH_TTY",
    "DBUS_SESSION_BUS_ADDRESS", "XDG_SESSION_ID", "XDG_RUNTIME_DIR",
    "DISPLAY", "WAYLAND_DISPLAY", "XAUTHORITY", "KRB5CCNAME", "GPG_AGENT_INFO", "TERM_SESSION_ID",
)  # fmt: skip
RUN_ENV_HELP = (
    "Environment: the job gets this shell's environment except the session's own variables ({session}), "
    "systemd's ({systemd}, WATCHDOG_*) and gpuguard's (GPUGUARD_*); each --env KEY=VALUE adds or overrides one; "
    "with --no-env it gets only the --env ones. gpuguard then sets CUDA_VISIBLE_DEVICES and its GPUGUARD_* "
    "variables itself."
).format(session=", ".join(SESSION_ENV), systemd=", ".join(contract.SYSTEMD_ENV))

EVENTS_DEFAULT = 100  # `events` without --limit: the newest this many
FOLLOW_DEFAULT = 10  # `events --follow` without --limit, as journalctl -f
_ID = re.compile(r"[0-9]+")
_AGO = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def socket_path(given: Path | None, config: Path | None) -> Path:
    """--socket, else $GPUGUARD_SOCKET, else the config's [daemon] socket."""
    if given is not None:
        return given
    if os.environ.get("GPUGUARD_SOCKET"):
        return Path(os.environ["GPUGUARD_SOCKET"])
    from gpuguard.config import ConfigError, load  # lazily: only this path needs the config

    try:
        return load(config).daemon.socket
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def wire_args(args: argparse.Namespace) -> dict[str, Any]:
    """The request's args for the parsed command line."""
    match args.command:
        case "events":
            if args.limit is not None and args.limit < 0:
                raise UsageError("--limit must be 0 or more")
            default = FOLLOW_DEFAULT if args.follow else EVENTS_DEFAULT
            limit = default if args.limit is None else args.limit
            since = since_args(args.since, time.time()) if args.since is not None else {}
            return {"limit": limit, "gpu": args.gpu, "job": args.job, **since}
        case "run":
            return run_spec(args)
        case "stop" | "snapshots":
            return {"name": args.name}
        case "rollback":
            return {"name": args.name, "snapshot": args.snapshot}
        case "exclude":
            return {"gpu": args.gpu, "reason": args.reason}
        case "include" | "reset":
            return {"gpu": args.gpu}
        case "inject":
            return {"gpu": args.gpu, "fault": args.fault, "value": args.value}
    return {}


def since_args(text: str, now: float) -> dict[str, Any]:
    """`--since`: an event id (digits), a time ago (`90s`, `10m`, `2h`, `1d`,
    `1w`) or an ISO-8601 time (without a zone: this machine's local time)."""
    if _ID.fullmatch(text):
        return {"since_id": int(text)}
    if ago := _AGO.fullmatch(text):
        return {"since": datetime.fromtimestamp(now - float(ago[1]) * _UNIT_S[ago[2]], UTC).isoformat()}
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"--since {text!r}: give an event id (123), a time ago (10m, 2h, 1d) or an ISO-8601 time (2025-01-31T12:00)"
        ) from None
    return {"since": when.astimezone(UTC).isoformat()}  # a naive time is local, as journalctl reads it


def run_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The job spec `run` sends: absolute paths, the environment of `job_env`."""
    command = list(args.argv)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise UsageError("run: give the job's command after --, e.g. run --name train -- python train.py")
    for flag, value, least in (("--gpus", args.gpus, 1), ("--min-gpus", args.min_gpus, 1), ("--max-restarts", args.max_restarts, 0)):
        if value is not None and value < least:
            raise UsageError(f"run: {flag} must be {least} or more")
    if args.min_gpus is not None and args.min_gpus > args.gpus:
        raise UsageError("run: --min-gpus must not exceed --gpus")
    workdir = os.path.abspath(args.workdir) if args.workdir else os.getcwd()
    checkpoint = os.path.normpath(os.path.join(workdir, args.checkpoint)) if args.checkpoint else None
    return {
        "name": args.name,
        "command": command,
        "gpus": args.gpus,
        "min_gpus": args.min_gpus,
        "checkpoint": checkpoint,
        "workdir": workdir,
        "max_restarts": args.max_restarts,
        "env": job_env(os.environ, args.env, inherit=not args.no_env),
    } | ({"standby": True} if args.standby else {})


def job_env(environ: Mapping[str, str], assignments: Sequence[str], *, inherit: bool) -> dict[str, str]:
    """The environment `run` sends: this shell's (unless not `inherit`) without
    the session's, systemd's and gpuguard's variables, then each KEY=VALUE."""
    env = {k: v for k, v in environ.items() if contract.for_job(k) and k not in SESSION_ENV} if inherit else {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"run: --env {item!r}: give KEY=VALUE")
        if not contract.for_job(key):
            raise UsageError(f"run: --env {key}: gpuguard and systemd set this variable themselves, not the job's caller")
        env[key] = value
    return env
