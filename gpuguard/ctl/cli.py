"""`main`: one gpuguardctl command, from its command line to its exit code."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from gpuguard.control.client import CommandFailed, DaemonUnreachable
from gpuguard.ctl.common import (
    CHECK_EXIT,
    EXIT_BROKEN_PIPE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    Daemon,
    UsageError,
    warn,
)
from gpuguard.ctl.live import follow_events, wait_for_job, watch_status
from gpuguard.ctl.logs import show_logs
from gpuguard.ctl.completion import script
from gpuguard.ctl.output import OUTPUT, print_reply
from gpuguard.ctl.parser import build_parser
from gpuguard.ctl.wire import socket_path, wire_args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _command(build_parser().parse_args(argv))
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        finally:
            sys.stdout.flush()  # here, not at exit, so that a gone reader is caught below (--help too)
    except BrokenPipeError:
        # the reader is gone (`| head`): end quietly, as tools killed by SIGPIPE do;
        # stdout goes to /dev/null so that the flush at exit does not complain
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE


def _command(args: argparse.Namespace) -> int:
    if args.command == "completion":  # needs no daemon
        print(script(args.shell), end="")
        return EXIT_OK
    check = args.command == "check"
    try:
        request_args = wire_args(args)
        daemon = Daemon(socket_path(getattr(args, "socket", None), getattr(args, "config", None)))
    except UsageError as exc:
        _fail(check, str(exc))
        return EXIT_USAGE
    try:
        return _run(args, daemon, request_args)
    except DaemonUnreachable as exc:
        _fail(check, str(exc))
        return CHECK_EXIT["unknown"] if check else EXIT_UNREACHABLE
    except CommandFailed as exc:
        if check:
            _fail(check, exc.message)
            return CHECK_EXIT["unknown"]
        warn(f"{args.command}: {exc.message}")
        return EXIT_USAGE if exc.code == "bad_request" else EXIT_FAILED


def _fail(check: bool, message: str) -> None:
    """`check` says everything in its one stdout line; the rest use stderr."""
    if check:
        print(f"gpuguard: unknown: {message}")
    else:
        warn(message)


def _run(args: argparse.Namespace, daemon: Daemon, request_args: dict[str, Any]) -> int:
    match args.command:
        case "status" if args.watch is not None:
            return watch_status(args, daemon)
        case "events" if args.follow:
            return follow_events(args, daemon, request_args)
        case "logs":
            return show_logs(args, daemon)
    result = daemon.call(args.command, request_args)
    if args.command == "run" and args.wait:
        if not args.json:  # with --json, only the job's entry once it has ended
            print_reply(args, result)
            sys.stdout.flush()
        return wait_for_job(args.name, daemon, as_json=args.json)
    if args.command == "events" and args.limit is None and not args.json and len(result) >= request_args["limit"]:
        # the default shows the newest only: say that older ones exist and how to get them
        warn(f"showing the newest {len(result)} events; older ones with --limit N or --since TIME|ID")
    return OUTPUT[args.command](args, result)
