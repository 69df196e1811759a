"""gpuguardctl's command line (CONTRACT.md's table)."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from gpuguard import __version__
from gpuguard.control.commands import COMMANDS
from gpuguard.ctl.wire import EVENTS_DEFAULT, FOLLOW_DEFAULT, RUN_ENV_HELP

WATCH_DEFAULT_S = 2.0  # `status --watch` without SECONDS, as watch(1)
LOGS_DEFAULT = 10  # `logs` without -n, as tail
LOGS_HELP = "the job's own output (stdout and stderr)"


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
    parser.add_argument("--version", action="version", version=f"gpuguardctl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, text: str | None = None) -> argparse.ArgumentParser:
        text = text or COMMANDS[name].help
        return sub.add_parser(name, parents=[common], help=text, description=text)

    p = add("status")
    p.add_argument("--json", action="store_true", help="the daemon's status as JSON (with --watch: one line each time)")
    p.add_argument("--watch", nargs="?", type=seconds, const=WATCH_DEFAULT_S, metavar="SECONDS",
                   help=f"redraw every SECONDS (default {WATCH_DEFAULT_S:g}) until interrupted")  # fmt: skip
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
    p.add_argument("name")
    p.add_argument("-n", "--lines", type=count, default=LOGS_DEFAULT, metavar="LINES",
                   help=f"the last LINES lines (default {LOGS_DEFAULT})")  # fmt: skip
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new output until interrupted")
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
    p.add_argument("--wait", action="store_true",
                   help="stay until the job ends; exit 0 if it succeeded, 1 if it failed or was stopped")  # fmt: skip
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
