"""The scripted trainer (jobs/trainer.py) run as a gpuguard job through a real gpuguardd:
starting it, waiting for an attempt, reading what each attempt recorded, and ending what
is left of it. Shared by the supervisor's e2e tests (`from .trainer_runs import ...`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import psutil

from harness import DaemonProc, wait_until

from .jobs.trainer import ATTEMPTS

TRAINER = Path(__file__).with_name("jobs") / "trainer.py"
GRACE_S = 2.0
# snapshots_keep: the trainer checkpoints every few steps, and a test reads back the snapshot an
# attempt resumed from; on a loaded machine five newer ones had pruned it before the read
FAST = f"[jobs]\ncheckpoint_grace_s = {GRACE_S}\nstop_timeout_s = 0.5\nsnapshots_keep = 1000\n"


def attempts(workdir: Path) -> list[dict[str, Any]]:
    """What each attempt of the trainer in `workdir` recorded of itself, oldest first."""
    try:
        return [json.loads(line) for line in (workdir / ATTEMPTS).read_text().splitlines()]
    except FileNotFoundError:
        return []


def run_trainer(d: DaemonProc, name: str, workdir: Path, *flags: str, max_restarts: int | None = None) -> None:
    extra = ["--max-restarts", str(max_restarts)] if max_restarts is not None else []
    d.ctl(
        "run", "--name", name, "--checkpoint", "ck.pt", "--workdir", str(workdir), *extra,
        "--", sys.executable, str(TRAINER), *flags,
    )  # fmt: skip


def running_attempt(d: DaemonProc, name: str, workdir: Path, attempt: int = 1) -> dict[str, Any]:
    """Wait until the job's given attempt runs and has recorded itself."""
    d.wait_for(
        lambda s: any(j["name"] == name and j["state"] == "running" and j["attempt"] == attempt for j in s["jobs"]),
        timeout_s=30,  # a spawn through the root wrapper on a loaded 2-core machine (the flake budget's)
        what=f"{name} attempt {attempt} running",
    )
    recorded = wait_until(lambda: attempts(workdir)[attempt - 1 :], 30, f"{name} attempt {attempt} recorded")
    return recorded[0]


def kill_leftovers(workdirs: list[Path]) -> None:
    """Jobs outlive their daemon by design: end the trainers (and grandchildren) the test started."""
    for workdir in workdirs:
        for rec in attempts(workdir):
            for pid in (rec["pid"], rec.get("grandchild")):
                try:
                    proc = psutil.Process(pid)
                    if any("trainer" in a or "SIG_IGN" in a for a in proc.cmdline()):
                        proc.kill()
                except (psutil.Error, TypeError):
                    continue
