"""gpuguardctl's command line (CONTRACT.md's table)."""

from __future__ import annotations

import argparse
from pathlib import Path

from gpuguard import __version__
from gpuguard.control.commands import COMMANDS
from gpuguard.ctl import helptext
from gpuguard.ctl.wire import EVENTS_DEFAULT, FOLLOW_DEFAULT

WATCH_DEFAULT_S = 2.0  # `status --watch` without SECONDS, as watch(1)
LOGS_DEFAULT = 10  # `logs` without -n, as tail
LOGS_HELP = "the job's own output (stdout and stderr)"
SHELLS = ("bash", "zsh")  # what `completion` writes scripts for
JSON_REPLY = "print the daemon's reply as JSON instead of a sentence"
GPU_HELP = "a GPU: its index or UUID"


def seconds(text: str) -> float:
    """A positive number of seconds (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.1 <= value <= 86400:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds between 0.1 and 86400")
    return value


def count(text: str) -> int:
    """A number of lines, 0 or more (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of lines, 0 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    """gpuguardctl's whole command line; every option and argument has its help."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: given before or after the command, the value is kept
    common.add_argument("--socket", type=Path, metavar="PATH", default=argparse.SUPPRESS,
                        help="the daemon's control socket (default: $GPUGUARD_SOCKET, else the config's)")  # fmt: skip
    common.add_argument("--config", type=Path, metavar="PATH", default=argparse.SUPPRESS,
                        help="the config file that names the socket (default /etc/gpuguard/config.toml)")  # fmt: skip
    parser = argparse.ArgumentParser(
        prog="gpuguardctl",
        parents=[common],
        description="Ask gpuguardd about GPU health and managed jobs. Socket: --socket, else $GPUGUARD_SOCKET, "
        "else the config's [daemon] socket. Exit status: 0 done, 1 refused or failed (the reason on stderr), "
        "2 usage error, 3 daemon unreachable; check has its own (see check --help).",
    )
    parser.add_argument("--version", action="version", version=f"gpuguardctl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, text: str | None = None, socket: bool = True) -> argparse.ArgumentParser:
        text = text or COMMANDS[name].help
        notes = helptext.NOTES.get(name)
        return sub.add_parser(
            name, parents=[common] if socket else [], help=text, description=text,
            epilog=helptext.epilog(notes) if notes else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps an epilog's lines
        )  # fmt: skip

    def reply_json(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--json", action="store_true", help=JSON_REPLY)
        return p

    p = add("status")
    p.add_argument("--json", action="store_true", help="the daemon's status as JSON (with --watch: one line each time)")
    p.add_argument("--watch", nargs="?", type=seconds, const=WATCH_DEFAULT_S, metavar="SECONDS",
                   help=f"redraw every SECONDS (default {WATCH_DEFAULT_S:g}) until interrupted")  # fmt: skip
    p.add_argument("--wide", action="store_true", help="full UUIDs, and no fitting to the terminal's width")
    p.add_argument("--no-color", action="store_true", help="no colour, even on a terminal (as NO_COLOR=1 does)")
    p = add("events")
    p.add_argument("--json", action="store_true", help="as a JSON list (with --follow: one JSON object per line)")
    p.add_argument("--limit", type=int, metavar="N",
                   help=f"the newest N events (default {EVENTS_DEFAULT}; {FOLLOW_DEFAULT} before --follow goes on)")  # fmt: skip
    p.add_argument("--gpu", metavar="G", help="only this GPU (index or UUID)")
    p.add_argument("--job", metavar="NAME", help="only this job")
    p.add_argument("--since", metavar="TIME|ID",
                   help="only events at or after TIME (ISO-8601, local unless it names a zone; or ago: 90s, 10m, 2h, 1d) "
                   "or after event ID")  # fmt: skip
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new events until interrupted")
    p = add("logs", LOGS_HELP)
    p.add_argument("name", help="the job's name")
    p.add_argument("-n", "--lines", type=count, default=LOGS_DEFAULT, metavar="LINES",
                   help=f"the last LINES lines (default {LOGS_DEFAULT})")  # fmt: skip
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new output until interrupted")
    p = reply_json(add("run"))
    p.add_argument("--name", required=True, help=helptext.RUN_NAME_HELP)
    p.add_argument("--gpus", type=int, default=1, metavar="N", help="GPUs to give the job (default 1)")
    p.add_argument("--min-gpus", type=int, metavar="N", help="run on fewer GPUs, down to N, rather than wait")
    p.add_argument("--checkpoint", metavar="PATH", help="the job's checkpoint file (relative to --workdir)")
    p.add_argument("--workdir", metavar="DIR", help="the job's working directory (default: here)")
    p.add_argument("--max-restarts", type=int, metavar="N", help=helptext.RUN_RESTARTS_HELP)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="set this variable for the job (repeatable)")
    p.add_argument("--no-env", action="store_true", help="send none of this shell's environment, only the --env ones")
    p.add_argument("--standby", action="store_true", help=helptext.RUN_STANDBY_HELP)
    p.add_argument("--wait", action="store_true",
                   help="stay until the job ends; exit 0 if it succeeded, 1 if it failed or was stopped, "
                   "75 if it was handed back to Slurm (requeued) "
                   "(with --json: print the job's status entry then, not the reply)")  # fmt: skip
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]", help="the job's command and its arguments")
    reply_json(add("stop")).add_argument("name", help="the job's name")
    p = add("snapshots")
    p.add_argument("name", help="the job's name")
    p.add_argument("--json", action="store_true", help="as a JSON list")
    p = reply_json(add("rollback"))
    p.add_argument("name", help="the job's name")
    p.add_argument("snapshot", nargs="?", help="the snapshot's id, from `snapshots NAME` (default: the one before the newest)")
    p = reply_json(add("exclude"))
    p.add_argument("gpu", metavar="GPU", help=GPU_HELP)
    p.add_argument("--reason", metavar="TEXT", help="why, for the record and status (default: excluded by operator)")
    reply_json(add("include", "return a GPU to service: forget its exclusion, Xids, hang suspicion and probation")
               ).add_argument("gpu", metavar="GPU", help=GPU_HELP)  # fmt: skip
    reply_json(add("reset")).add_argument("gpu", metavar="GPU", help=GPU_HELP)
    p = add("healthy", "the GPUs a scheduler may use now, one line; exit 1 (and no line) when there is none")
    p.add_argument("--format", choices=("cuda", "index", "uuid"), default="cuda",
                   help="cuda: UUIDs for CUDA_VISIBLE_DEVICES (the default); index: indices; uuid: UUIDs")  # fmt: skip
    p = reply_json(add("inject", "simulated GPUs only: inject a fault, or list a process on a GPU"))
    p.add_argument("gpu", metavar="GPU", help=GPU_HELP)
    p.add_argument("fault", metavar="FAULT", help="one of the faults below")
    p.add_argument("value", nargs="?", metavar="VALUE", help="the fault's CODE, COUNT, CELSIUS, SECONDS or PID")
    add("check", helptext.CHECK_HELP)
    p = add("completion", "print a shell completion script", socket=False)
    p.add_argument("shell", choices=SHELLS, help="the shell to complete for")
    return parser
