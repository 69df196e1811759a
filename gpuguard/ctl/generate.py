"""The build step for what ships beside the code: the shell completions
(`completions/`, by shtab) and the man pages (`man/`, by argparse-manpage),
all generated from the argparse parsers.

    python -m gpuguard.ctl.generate          # rewrite them
    python -m gpuguard.ctl.generate --check  # exit 1 if any is stale

argparse-manpage is a dev dependency: only this step imports it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from unittest import mock

from gpuguard import __version__
from gpuguard.ctl.completion import FILES, script
from gpuguard.ctl.helptext import NOTES, Block
from gpuguard.ctl.parser import build_parser

HERE = Path(__file__).parent
COMPLETIONS = HERE / "completions"
MAN = HERE / "man"
MANUAL = "gpuguard manual"
COLUMNS = 80
# each program's NAME line, and the sections its --help has no place for
SUMMARY = {
    "gpuguardctl": "the operator's CLI of gpuguardd",
    "gpuguardd": "GPU health daemon and training supervisor",
    "gpuguard-yolo": "Ultralytics YOLO training under gpuguard",
}
SECTIONS: dict[str, dict[str, Sequence[Block]]] = {
    "gpuguardctl": {f"gpuguardctl {name}": blocks for name, blocks in NOTES.items()},
    "gpuguardd": {
        "exit status": (
            "0 after SIGTERM or SIGINT (a clean stop); 2 on a config or usage error (the message names the file, "
            "the key and what is wrong); 1 on any other fatal error.",
        ),
    },
}


class _Built(Exception):
    """Carries a parser out of a function that builds and then parses."""


def _caught(parse: Callable[[list[str]], object]) -> argparse.ArgumentParser:
    """The parser a `parse_args(argv)`-style function builds (gpuguardd's),
    taken at the moment it would parse: its module stays as it is."""

    def grab(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _Built(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", grab):
        try:
            parse([])
        except _Built as built:
            return built.args[0]  # type: ignore[no-any-return]
    raise RuntimeError(f"{parse!r} never parsed")


def parsers() -> dict[str, argparse.ArgumentParser]:
    """The three programs' parsers, by program name."""
    from gpuguard.daemon.main import parse_args
    from gpuguard.integrations.ultralytics import _parser as yolo_parser

    return {"gpuguardctl": build_parser(), "gpuguardd": _caught(parse_args), "gpuguard-yolo": yolo_parser()}


def man_page(prog: str, parser: argparse.ArgumentParser) -> str:
    """The man page (section 1) of one program; undated, so a rebuild is identical."""
    from argparse_manpage.manpage import Manpage

    page = Manpage(parser)
    page.date, page.source, page.manual, page.description = "", f"gpuguard {__version__}", MANUAL, SUMMARY[prog]
    for heading, blocks in SECTIONS.get(prog, {}).items():
        page.add_section(heading, ">", "\n".join(map(_roff, blocks)))
    return str(page)


def _roff(block: Block) -> str:
    """One block of help notes as man(7) markup: a paragraph, or a title and tagged items."""
    if isinstance(block, str):
        return f".PP\n{_text(block)}"
    title, items = block
    return "\n".join([f".PP\n{_text(title)}", *(f".TP\n\\fB{_text(term)}\\fR\n{_text(text)}" for term, text in items)])


def _text(text: str) -> str:
    """Text safe on a man(7) line: backslashes and hyphens escaped, never read as a request."""
    return "\\&" + text.replace("\\", "\\e").replace("-", "\\-")


def outputs() -> dict[Path, str]:
    """Every generated file and what it must hold (argparse wraps usage lines
    to $COLUMNS: fixed here, so the terminal does not change them)."""
    with mock.patch.dict(os.environ, {"COLUMNS": str(COLUMNS)}):
        files = {COMPLETIONS / name: script(shell) for shell, name in FILES.items()}
        files.update({MAN / f"{prog}.1": man_page(prog, parser) for prog, parser in parsers().items()})
    return files


def main(argv: Sequence[str] | None = None) -> int:
    cli = argparse.ArgumentParser(
        prog="python -m gpuguard.ctl.generate", description="Regenerate gpuguard's shell completions and man pages."
    )
    cli.add_argument("--check", action="store_true", help="write nothing; exit 1 if a shipped file differs")
    args = cli.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
    for path in stale:
        print(f"{'stale' if args.check else 'wrote'} {path.relative_to(HERE.parent.parent)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
