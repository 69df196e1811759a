"""gpuguardctl: the operator's CLI, a thin client of gpuguardd's control socket.

Commands, flags, output and exit codes are fixed by CONTRACT.md: 0 done,
1 refused or failed, 2 usage error, 3 daemon unreachable; `check` exits
0 healthy, 1 unhealthy, 2 unknown (node-problem-detector's plugin protocol).

- `cli`: `main`, one command from parsing to exit code.
- `parser`, `helptext`: the command line, and the longer texts of its --help.
- `wire`: the socket path and what each command sends.
- `output`: what each command prints (JSON with --json).
- `status_table`, `reasons`, `tables`: `status` within the terminal's width,
  why a GPU is not healthy in sentences, columns that fit.
- `replies`: the changing commands' sentences.
- `live`: the commands that keep running (`status --watch`, `events --follow`, `run --wait`).
- `logs`: a job's own output, read as the caller.
- `completion`, `generate`: shell completion (shtab), and the build step that
  writes the shipped completions and man pages (argparse-manpage).
"""

from __future__ import annotations

from gpuguard.ctl.cli import main
from gpuguard.ctl.wire import SESSION_ENV

__all__ = ["SESSION_ENV", "main"]
