"""A job's blueprint: what to run, where, as whom, on how many GPUs.

One builder for each way a job arrives (a `[[job]]` entry of the config, a
`gpuguardctl run` request); both resolve the checkpoint path the same way.
The blueprint never changes while the job lives; what changes is its
`Attempt` (job.py).
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpuguard import contract
from gpuguard.config import YOLO_SAVE_EVERY, JobEntry
from gpuguard.supervisor.process import UserSpec


class JobError(Exception):
    """A request about jobs that cannot be done; the message says why."""

    def __init__(self, message: str, code: str = "failed") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class JobSpec:
    name: str
    command: tuple[str, ...]
    workdir: Path
    env: Mapping[str, str] = field(default_factory=dict)
    user: UserSpec | None = None  # None: runs as the daemon's user (root)
    user_name: str | None = None
    gpus_wanted: int = 1
    min_gpus: int | None = None
    checkpoint: Path | None = None  # absolute
    max_restarts: int = 10
    source: str = "cli"  # "config" | "cli"
    standby: bool = False  # keep a warm standby of the next attempt (standby.py)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out |= {"command": list(self.command), "workdir": str(self.workdir), "env": dict(self.env)}
        out["checkpoint"] = str(self.checkpoint) if self.checkpoint else None
        return out

    @classmethod
    def from_json(cls, rec: Mapping[str, Any]) -> JobSpec:
        user = rec.get("user")
        if isinstance(user, (list, tuple)):  # records written before the blueprint had its own type
            user = {"uid": user[0], "gid": user[1], "groups": user[2]}
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in rec.items() if k in names}
        return cls(
            **values
            | {
                "command": tuple(rec["command"]),
                "workdir": Path(rec["workdir"]),
                "env": dict(rec.get("env") or {}),
                "user": UserSpec(int(user["uid"]), int(user["gid"]), tuple(user["groups"])) if user else None,
                "checkpoint": Path(rec["checkpoint"]) if rec.get("checkpoint") else None,
            }
        )


def resolve_checkpoint(path: str | Path | None, workdir: Path) -> Path | None:
    """A relative checkpoint path is relative to the job's working directory."""
    if not path:
        return None
    path = Path(path)
    return path if path.is_absolute() else workdir / path


def from_entry(entry: JobEntry, default_max_restarts: int) -> JobSpec:
    """A `[[job]]` entry: runs as its `user` with a minimal login-like environment;
    a `yolo` table instead of a command runs gpuguard-yolo."""
    workdir = entry.workdir or Path("/")
    yolo = dict(entry.yolo)
    every = yolo.pop(YOLO_SAVE_EVERY, None)
    command = tuple(entry.command) or (
        str(Path(sys.executable).parent / "gpuguard-yolo"),
        "train",
        *(["--save-every-s", every] if every is not None else []),
        *(f"{key}={value}" for key, value in yolo.items()),
    )
    return JobSpec(
        name=entry.name,
        command=command,
        workdir=workdir,
        env=_login_env(entry.user) | dict(entry.env),
        user=UserSpec.lookup(entry.user) if entry.user else None,
        user_name=entry.user,
        gpus_wanted=entry.gpus,
        min_gpus=entry.min_gpus,
        checkpoint=resolve_checkpoint(entry.checkpoint, workdir),
        max_restarts=entry.max_restarts if entry.max_restarts is not None else default_max_restarts,
        source="config",
        # gpuguard-yolo waits for its hand-over; a generic command may not (docs/BENCHMARKS.md "Warm standby")
        standby=entry.standby if entry.standby is not None else bool(entry.yolo and not entry.command),
    )


def _login_env(user: str | None) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", os.defpath), "LANG": os.environ.get("LANG", "C.UTF-8")}
    if user:
        entry = pwd.getpwnam(user)
        env |= {"HOME": entry.pw_dir, "USER": entry.pw_name, "LOGNAME": entry.pw_name}
    return env


def from_request(req: Mapping[str, Any], uid: int, gid: int, groups: tuple[int, ...], default_max_restarts: int) -> JobSpec:
    """`gpuguardctl run`: the command runs as the caller (root only if root asked)."""
    name = req.get("name") or ""
    if not contract.valid_job_name(name):
        raise JobError(f"bad job name {name!r}: letters, digits, '_', '.', '-', at most 64", "bad_request")
    command = req.get("command") or []
    if not command or not command[0] or not all(isinstance(a, str) and "\0" not in a for a in command):
        raise JobError("run needs a command after -- (a program name, no NUL in any argument)", "bad_request")
    gpus = int(req.get("gpus") or 1)
    min_gpus = req.get("min_gpus")
    if gpus < 1 or (min_gpus is not None and not 1 <= int(min_gpus) <= gpus):
        raise JobError("--gpus must be >= 1 and --min-gpus between 1 and --gpus", "bad_request")
    workdir = Path(req.get("workdir") or "/")
    if not workdir.is_absolute():
        raise JobError(f"workdir {workdir} is not an absolute directory", "bad_request")
    try:
        user_name = pwd.getpwuid(uid).pw_name
    except KeyError:
        user_name = str(uid)
    max_restarts = req.get("max_restarts")
    return JobSpec(
        name=name,
        command=tuple(command),
        workdir=workdir,
        env={str(k): str(v) for k, v in (req.get("env") or {}).items()},
        user=None if uid == 0 else UserSpec(uid, gid, tuple(g for g in groups if g != gid)),
        user_name=user_name,
        gpus_wanted=gpus,
        min_gpus=int(min_gpus) if min_gpus is not None else None,
        checkpoint=resolve_checkpoint(req.get("checkpoint"), workdir),
        max_restarts=int(max_restarts) if max_restarts is not None else default_max_restarts,
        source="cli",
        standby=req.get("standby") is True,
    )
