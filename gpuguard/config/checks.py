"""The config's semantic checks, apart from the loader's type checks: what a
well-typed Config may still get wrong (ranges, placeholders, job entries), and
whether a file or directory is safe to take commands from.

They report (dotted key, problem) pairs and never raise, so the loader words
the error once, with the file's name.
"""

from __future__ import annotations

import json
import math
import os
import signal
import stat
import string
from collections.abc import Iterator
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from gpuguard.config.schema import LOG_FORMATS, LOG_LEVELS, RESERVED_ENV, YOLO_SAVE_EVERY, Config, JobEntry
from gpuguard.contract import ENV_PREFIX, HOOK_PLACEHOLDERS, RESET_PLACEHOLDERS, SLURM_NODE_NAME, SLURM_PLACEHOLDERS, valid_job_name
from gpuguard.storage.url import url_problem

# counts for which 0 makes no sense
_AT_LEAST_ONE = frozenset({"gpus", "min_gpus", "snapshots_keep", "snapshots_max_bytes", "event_retention_max_rows"})


def unsafe_owner_or_mode(st: os.stat_result, *, sticky_ok: bool = False) -> str | None:
    """Why a file or directory with this stat lets someone other than root or
    this process's user change it, or None when it does not.

    The config names commands the daemon runs as root ([reset], [hooks],
    [[job]]) and the state dir holds its memory, so either being writable by
    another user hands that user the daemon's privileges. Group write is fine
    for root's group or this process's own; `sticky_ok` accepts a world-writable
    directory with the sticky bit (/tmp), where others cannot replace a file
    they do not own.
    """
    if st.st_uid not in (0, os.geteuid()):
        return f"owned by uid {st.st_uid}, neither root nor this process's user"
    if st.st_mode & stat.S_IWOTH and not (sticky_ok and st.st_mode & stat.S_ISVTX):
        return f"writable by every user (mode {stat.S_IMODE(st.st_mode):04o})"
    if st.st_mode & stat.S_IWGRP and st.st_gid not in (0, os.getegid()):
        return f"writable by group {st.st_gid} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def unsafe_directory(directory: Path) -> str | None:
    """Whoever may write the config's directory may replace the config."""
    try:
        st = os.stat(directory)
    except OSError:
        return None  # the file opened, so the directory exists; a stat refused here tells nothing new
    problem = unsafe_owner_or_mode(st, sticky_ok=True)
    return f"its directory {directory} is {problem}" if problem else None


def problems(config: Config) -> Iterator[tuple[str, str]]:
    """Every (dotted key, problem) in a well-typed config, in file order."""
    for key, value in _leaves(config, ""):
        problem = _range_problem(key.rsplit(".", 1)[-1], value)
        if problem:
            yield key, problem
    daemon, health, reset, jobs = config.daemon, config.health, config.reset, config.jobs
    if daemon.log_level not in LOG_LEVELS:
        yield "daemon.log_level", f"must be one of {', '.join(LOG_LEVELS)}; got {json.dumps(daemon.log_level)}"
    if daemon.log_format not in LOG_FORMATS:
        yield "daemon.log_format", f"must be one of {', '.join(LOG_FORMATS)}; got {json.dumps(daemon.log_format)}"
    if not daemon.admin_group:
        yield "daemon.admin_group", "must not be empty"
    if daemon.socket_mode > 0o777:
        yield "daemon.socket_mode", f"must be permission bits, at most 0o777; got {daemon.socket_mode:#o}"
    if health.temperature_degraded_c >= health.temperature_faulted_c:
        yield "health.temperature_degraded_c", (
            f"must be below temperature_faulted_c ({health.temperature_faulted_c}); got {health.temperature_degraded_c}"
        )
    if not reset.command or not reset.command[0]:
        yield "reset.command", "must name a program: a non-empty argv list"
    else:
        yield from _placeholder_problems("reset.command", reset.command, RESET_PLACEHOLDERS)
    if not 1 <= config.metrics.port <= 65535:
        yield "metrics.port", f"must be a TCP port, 1 to 65535; got {config.metrics.port}"
    if not config.metrics.address:
        yield "metrics.address", 'must not be empty; "127.0.0.1" keeps metrics on this machine'
    for name in ("on_unhealthy", "on_recovered"):
        hook = getattr(config.hooks, name)
        if hook and not hook[0]:
            yield f"hooks.{name}", "must name a program, or be empty for no hook"
        yield from _placeholder_problems(f"hooks.{name}", hook, HOOK_PLACEHOLDERS)
    yield from _slurm_problems(config)
    if config.storage.url and (problem := url_problem(config.storage.url)):
        yield "storage.url", problem
    if jobs.backoff_initial_s > jobs.backoff_max_s:
        yield "jobs.backoff_initial_s", f"must not exceed backoff_max_s ({jobs.backoff_max_s}); got {jobs.backoff_initial_s}"
    problem = _signal_problem(jobs.checkpoint_signal)
    if problem:
        yield "jobs.checkpoint_signal", problem
    for i, name in enumerate(jobs.foreign_never_signal):
        if not name or "/" in name or "\0" in name:
            yield f"jobs.foreign_never_signal[{i}]", (
                f"must be a process name such as \"nv-hostengine\", not a path or empty; got {json.dumps(name)}"
            )
    seen: dict[str, int] = {}
    for i, job in enumerate(config.job):
        yield from _job_problems(job, f"job[{i}]", seen)
        seen.setdefault(job.name, i)


def _slurm_problems(config: Config) -> Iterator[tuple[str, str]]:
    """[slurm]: argv lists with their placeholders; a drain runs only within a requeue."""
    slurm = config.slurm
    for name in ("drain", "requeue"):
        argv = getattr(slurm, name)
        if argv and not argv[0]:
            yield f"slurm.{name}", "must name a program, or be empty for none"
        yield from _placeholder_problems(f"slurm.{name}", argv, SLURM_PLACEHOLDERS)
    for i, node in enumerate(slurm.nodes):
        if not SLURM_NODE_NAME.fullmatch(node):
            yield f"slurm.nodes[{i}]", f"{node!r} is not one Slurm node name (letters, digits, '.', '_', '-'; no host lists)"
    if slurm.drain and not slurm.requeue:
        yield "slurm.drain", "runs only when a job is handed back with slurm.requeue: set requeue too (or drain with [hooks] on_unhealthy)"


def _leaves(obj: Any, key: str) -> Iterator[tuple[str, object]]:
    """(dotted key, value) for every field below the dataclass `obj`, jobs as job[i]."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        sub = f"{key}.{f.name}" if key else f.name
        if is_dataclass(value):
            yield from _leaves(value, sub)
        elif f.name == "job":
            for i, job in enumerate(value):
                yield from _leaves(job, f"{sub}[{i}]")
        elif f.name != "source":
            yield sub, value


def _range_problem(name: str, value: object) -> str | None:
    """The rule a number's field name implies: finite, durations > 0, percentages 0..100, counts >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value):
        return f"must be a finite number; got {value}"
    if name in _AT_LEAST_ONE and value < 1:
        return f"must be 1 or more; got {value}"
    if name.endswith(("_s", "_days")) and value <= 0:
        return f"must be greater than 0; got {value}"
    if name.endswith("_pct") and not 0 <= value <= 100:
        return f"must be a percentage, 0 to 100; got {value}"
    if value < 0:
        return f"must be 0 or more; got {value}"
    return None


def _signal_problem(name: str) -> str | None:
    """Why `name` cannot be the checkpoint signal, or None when it can."""
    if not name.startswith("SIG") or name not in signal.Signals.__members__:
        hint = f'; did you mean "SIG{name.upper()}"?' if f"SIG{name.upper()}" in signal.Signals.__members__ else ""
        return f'must be a signal name in its SIG form, such as "SIGUSR1"; got {json.dumps(name)}{hint}'
    if name in ("SIGKILL", "SIGSTOP"):
        return f"{name} cannot be caught, so a job could never checkpoint on it"
    return None


def _placeholder_problems(key: str, argv: tuple[str, ...], placeholders: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    """An argv template's arguments: only the given {placeholders}, each well formed,
    so filling them in (str.format_map) can never fail at the moment it matters."""
    allowed = ", ".join(f"{{{name}}}" for name in placeholders)
    for i, arg in enumerate(argv):
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(arg) if name is not None]
            unknown = [name for name in names if name not in placeholders]
            if not unknown:
                arg.format_map(dict.fromkeys(placeholders, "x"))
        except ValueError as exc:
            yield f"{key}[{i}]", f"bad placeholder in {json.dumps(arg)}: {exc} (write {{{{ for a literal brace)"
            continue
        if unknown:
            yield f"{key}[{i}]", f"unknown placeholder {{{unknown[0]}}} in {json.dumps(arg)}; allowed: {allowed}"


def _job_problems(job: JobEntry, key: str, seen: dict[str, int]) -> Iterator[tuple[str, str]]:
    """One [[job]]'s checks; `seen` maps the names of the jobs before it to their index."""
    if not valid_job_name(job.name):
        yield f"{key}.name", (
            f"{json.dumps(job.name)} is not a job name: 1 to 64 of A-Z a-z 0-9 _ . -, starting with a letter or digit"
        )
    elif job.name in seen:
        yield f"{key}.name", f"{json.dumps(job.name)} is already the name of job[{seen[job.name]}]"
    if job.command and job.yolo:
        yield f"{key}.yolo", "give either command or yolo, not both"
    elif job.yolo:
        names = {name for name, _ in job.yolo}
        if "data" not in names:
            yield f"{key}.yolo", "needs data = \"/abs/path/data.yaml\""
        every = dict(job.yolo).get(YOLO_SAVE_EVERY)
        if every is not None and not _non_negative_number(every):
            yield f"{key}.yolo.{YOLO_SAVE_EVERY}", f"must be a number of seconds, 0 or more (0: off); got {every}"
    elif not job.command or not job.command[0]:
        yield f"{key}.command", "must name a program: a non-empty argv list (or give yolo = { ... })"
    if job.min_gpus is not None and not 1 <= job.min_gpus <= job.gpus:
        yield f"{key}.min_gpus", f"must be between 1 and gpus ({job.gpus}); got {job.min_gpus}"
    if job.user is not None and not job.user:
        yield f"{key}.user", "must not be empty; leave it out to run as the daemon's user"
    for name, _ in job.env:
        if not name or "=" in name or "\0" in name:
            yield f"{key}.env", f"{json.dumps(name)} is not an environment variable name"
        elif name == RESERVED_ENV or name.startswith(ENV_PREFIX):
            yield f"{key}.env.{name}", "is set by gpuguard for every job and cannot be set here"
    if job.checkpoint is not None and not job.checkpoint.is_absolute() and job.workdir is None:
        yield f"{key}.checkpoint", f"the relative path {json.dumps(str(job.checkpoint))} needs a workdir to be relative to"


def _non_negative_number(text: str) -> bool:
    """Training arguments are kept as text, so save_every_s is checked by parsing it."""
    try:
        return float(text) >= 0
    except ValueError:
        return False
