"""gpuguardctl: the operator's CLI, a thin client of gpuguardd's control socket.

Commands, flags, output and exit codes are fixed by CONTRACT.md: 0 done,
1 refused or failed, 2 usage error, 3 daemon unreachable; `check` exits
0 healthy, 1 unhealthy, 2 unknown (node-problem-detector's plugin protocol).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gpuguard import contract
from gpuguard.control.client import CommandFailed, DaemonUnreachable, request
from gpuguard.control.commands import COMMANDS

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
CHECK_EXIT = {"healthy": 0, "unhealthy": 1, "unknown": 2}

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


class UsageError(Exception):
    """A usage problem found after parsing (exit 2)."""


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: given before or after the command, the value is kept
    common.add_argument("--socket", type=Path, metavar="PATH", default=argparse.SUPPRESS, help="the daemon's control socket")
    common.add_argument("--config", type=Path, metavar="PATH", default=argparse.SUPPRESS, help="config file naming the socket")
    parser = argparse.ArgumentParser(
        prog="gpuguardctl",
        parents=[common],
        description="Ask gpuguardd about GPU health and managed jobs. Socket: --socket, else $GPUGUARD_SOCKET, "
        "else the config's [daemon] socket.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=COMMANDS[name].help, description=COMMANDS[name].help)

    add("status").add_argument("--json", action="store_true", help="the daemon's status as JSON")
    p = add("events")
    p.add_argument("--json", action="store_true", help="as a JSON list")
    p.add_argument("--limit", type=int, metavar="N", help="the newest N events")
    p.add_argument("--gpu", metavar="G", help="only this GPU (index or UUID)")
    p.add_argument("--job", metavar="NAME", help="only this job")
    p = add("run")
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the epilog's paragraphs
    example = "The job's command follows --, e.g.: gpuguardctl run --name train --gpus 2 -- python train.py"
    p.epilog = "\n\n".join(textwrap.fill(par, 79) for par in (example, RUN_ENV_HELP))
    p.add_argument("--name", required=True)
    p.add_argument("--gpus", type=int, default=1, metavar="N", help="GPUs to give the job (default 1)")
    p.add_argument("--min-gpus", type=int, metavar="N", help="run on fewer GPUs, down to N, rather than wait")
    p.add_argument("--checkpoint", metavar="PATH", help="the job's checkpoint file (relative to --workdir)")
    p.add_argument("--workdir", metavar="DIR", help="the job's working directory (default: here)")
    p.add_argument("--max-restarts", type=int, metavar="N")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="set this variable for the job (repeatable)")
    p.add_argument("--no-env", action="store_true", help="send none of this shell's environment, only the --env ones")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")
    add("stop").add_argument("name")
    p = add("snapshots")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="as a JSON list")
    p = add("rollback")
    p.add_argument("name")
    p.add_argument("snapshot", nargs="?", help="default: the one before the newest")
    p = add("exclude")
    p.add_argument("gpu", metavar="GPU")
    p.add_argument("--reason", metavar="TEXT")
    add("include").add_argument("gpu", metavar="GPU")
    add("reset").add_argument("gpu", metavar="GPU")
    p = add("healthy")
    p.add_argument("--format", choices=("cuda", "index", "uuid"), default="cuda")
    p = add("inject")
    p.add_argument("gpu", metavar="GPU")
    p.add_argument("fault", metavar="FAULT")
    p.add_argument("value", nargs="?", metavar="VALUE")
    add("check")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        wire_args = _wire_args(args)
        path = socket_path(getattr(args, "socket", None), getattr(args, "config", None))
    except UsageError as exc:
        if args.command == "check":
            print(f"gpuguard: unknown: {exc}")
        else:
            print(f"gpuguardctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = request(path, args.command, wire_args)
    except DaemonUnreachable as exc:
        if args.command == "check":
            print(f"gpuguard: unknown: {exc}")
            return CHECK_EXIT["unknown"]
        print(f"gpuguardctl: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except CommandFailed as exc:
        if args.command == "check":
            print(f"gpuguard: unknown: {exc.message}")
            return CHECK_EXIT["unknown"]
        print(f"gpuguardctl: {args.command}: {exc.message}", file=sys.stderr)
        return EXIT_USAGE if exc.code == "bad_request" else EXIT_FAILED
    return OUTPUT.get(args.command, _print_summary)(args, result)


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


def _wire_args(args: argparse.Namespace) -> dict[str, Any]:
    """The request's args for the parsed command line."""
    match args.command:
        case "events":
            if args.limit is not None and args.limit < 0:
                raise UsageError("--limit must be 0 or more")
            return {"limit": args.limit, "gpu": args.gpu, "job": args.job}
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
    }


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



# --- output ---------------------------------------------------------------


def _print_status(args: argparse.Namespace, status: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps(status, indent=2))
        return EXIT_OK
    gpus = status.get("gpus") or []
    print(
        table(
            ("GPU", "UUID", "STATE", "REASON", "TEMP", "UTIL", "MEM", "JOBS"),
            [
                (
                    g.get("index"),
                    short_uuid(g.get("uuid")),
                    g.get("state"),
                    g.get("reason"),
                    _unit(g.get("temperature_c"), "C"),
                    _unit(g.get("gpu_util_pct"), "%"),
                    _memory(g.get("memory_used_bytes"), g.get("memory_total_bytes")),
                    ",".join(g.get("jobs") or []),
                )
                for g in gpus
            ],
        )
        if gpus
        else "no GPUs"
    )
    jobs = status.get("jobs") or []
    print()
    print(
        table(
            ("JOB", "STATE", "GPUS", "ATTEMPT", "RESTARTS", "PID", "CHECKPOINT"),
            [
                (
                    j.get("name"),
                    j.get("state"),
                    ",".join(short_uuid(u) for u in j.get("gpus") or []),
                    j.get("attempt"),
                    j.get("restarts"),
                    j.get("pid"),
                    j.get("checkpoint"),
                )
                for j in jobs
            ],
        )
        if jobs
        else "no jobs"
    )
    d = status.get("daemon") or {}
    print()
    print(
        f"daemon: gpuguardd {d.get('version', '?')}, backend {d.get('backend', '?')}, "
        f"pid {d.get('pid', '?')}, up {_duration(d.get('uptime_s'))}"
    )
    return EXIT_OK


def _print_events(args: argparse.Namespace, events: list[dict[str, Any]]) -> int:
    if args.json:
        print(json.dumps(events, indent=2))
        return EXIT_OK
    if not events:
        print("no events")
        return EXIT_OK
    print(
        table(
            ("TIME", "SEVERITY", "KIND", "GPU", "JOB", "MESSAGE"),
            [
                (e.get("ts"), e.get("severity"), e.get("kind"), short_uuid(e.get("gpu")), e.get("job"), e.get("message"))
                for e in events
            ],
        )
    )
    return EXIT_OK


def _print_snapshots(args: argparse.Namespace, snapshots: list[dict[str, Any]]) -> int:
    if args.json:
        print(json.dumps(snapshots, indent=2))
        return EXIT_OK
    if not snapshots:
        print(f"no snapshots for {args.name}")
        return EXIT_OK
    keys = list(dict.fromkeys(k for s in snapshots for k in s))
    print(table([k.upper() for k in keys], [[s.get(k) for k in keys] for s in snapshots]))
    return EXIT_OK


def _print_healthy(args: argparse.Namespace, gpus: list[dict[str, Any]]) -> int:
    key = "index" if args.format == "index" else "uuid"
    print(",".join(str(g[key]) for g in gpus))
    return EXIT_OK


def _print_check(args: argparse.Namespace, verdict: dict[str, Any]) -> int:
    status = verdict.get("status")
    print(verdict.get("message") or f"gpuguard: {status}")
    return CHECK_EXIT.get(status, CHECK_EXIT["unknown"])


def _print_summary(args: argparse.Namespace, result: Any) -> int:
    """The changing commands: their result as one `key=value` line."""
    if isinstance(result, dict):
        print(" ".join(f"{k}={_cell(v)}" for k, v in result.items()))
    elif result is not None:
        print(json.dumps(result))
    return EXIT_OK


OUTPUT: dict[str, Callable[[argparse.Namespace, Any], int]] = {
    "status": _print_status,
    "events": _print_events,
    "snapshots": _print_snapshots,
    "healthy": _print_healthy,
    "check": _print_check,
}


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns, two spaces apart; None shows as '-'."""
    cells = [list(headers)] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def short_uuid(uuid: str | None) -> str | None:
    """`GPU-1a2b3c4d`: enough to tell a node's GPUs apart."""
    return uuid[:12] if uuid else uuid


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _unit(value: Any, unit: str) -> str | None:
    return None if value is None else f"{value}{unit}"


def _memory(used: Any, total: Any) -> str | None:
    if not isinstance(used, (int, float)) or not isinstance(total, (int, float)):
        return None
    gib = 1024**3
    return f"{used / gib:.1f}/{total / gib:.1f}GiB"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "?"
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{s:02d}s"


if __name__ == "__main__":
    sys.exit(main())
