"""`gpuguardctl completion bash|zsh`: a shell completion script, generated
from the argparse parser by shtab. The same scripts ship in `completions/`
for packagers (python -m gpuguard.ctl.generate writes them)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from gpuguard.ctl.parser import build_parser

# where each shell's script ships, under gpuguard/ctl/completions/ (the names
# bash-completion and zsh's fpath look for)
FILES = {"bash": "gpuguardctl", "zsh": "_gpuguardctl"}
# metavar -> shtab's completion of it
_FILE_METAVARS = {"PATH": "FILE", "DIR": "DIRECTORY"}


def script(shell: str) -> str:
    """The completion script for `shell` (one of parser.SHELLS)."""
    import shtab  # only this command needs it

    parser = build_parser()
    for action in every_action(parser):
        kind = _FILE_METAVARS.get(str(action.metavar))
        if kind is not None:
            action.complete = getattr(shtab, kind)  # type: ignore[attr-defined]
    text = shtab.complete(parser, shell=shell)
    return text if text.endswith("\n") else text + "\n"


def every_action(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    """Every action of the parser and of its subcommands."""
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from every_action(sub)
