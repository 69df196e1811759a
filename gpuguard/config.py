"""The daemon's configuration: TOML in, a frozen typed Config out.

Every key has a default here; `config.example.toml` documents each one.
Unknown keys and wrong types are errors that name the file, the key and what
is wrong (`ConfigError`), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import signal
import stat
import string
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from types import UnionType
from typing import Any, NewType, TypeVar, get_args, get_origin, get_type_hints

from gpuguard.contract import ENV_PREFIX, HOOK_PLACEHOLDERS, RESET_PLACEHOLDERS, valid_job_name

DEFAULT_CONFIG_PATH = Path("/etc/gpuguard/config.toml")

_T = TypeVar("_T")

# permission bits; the file may say "0660" (as chmod does) or the TOML octal 0o660
FileMode = NewType("FileMode", int)


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    socket: Path = Path("/run/gpuguard/gpuguard.sock")
    state_dir: Path = Path("/var/lib/gpuguard")
    # members of this group (and root) may use changing commands; the socket's group
    admin_group: str = "gpuguard"
    # the control socket's permission bits; 0o666 lets every user run read-only commands
    socket_mode: FileMode = FileMode(0o660)
    log_level: str = "info"  # debug | info | warning | error
    log_format: str = "auto"  # auto (console on a TTY, JSON otherwise) | console | json
    event_retention_days: float = 90.0
    event_retention_max_rows: int = 200_000


@dataclass(frozen=True, slots=True)
class MonitorConfig:
    poll_interval_s: float = 1.0
    hang_timeout_s: float = 300.0  # no progress and an idle GPU this long = hang
    # until an attempt's first heartbeat or checkpoint (start-up: imports, data, CUDA init)
    hang_startup_timeout_s: float = 600.0
    hang_idle_util_pct: int = 5  # at or below this utilisation a GPU counts as idle
    nvml_timeout_s: float = 2.0  # deadline for one poll of all GPUs
    kernel_log: Path = Path("/dev/kmsg")
    nvml_events: bool = True


@dataclass(frozen=True, slots=True)
class HealthConfig:
    temperature_degraded_c: int = 87
    temperature_faulted_c: int = 95
    # corrected (single-bit) ECC errors per hour, from the volatile counter
    ecc_corrected_rate_degraded_per_h: float = 100.0
    retired_pages_degraded: int = 48  # SBE + DBE retired pages
    hw_slowdown_degraded_s: float = 60.0  # HW slowdown/power brake held this long
    restart_app_window_s: float = 120.0  # how long a restart-the-app Xid stays active


@dataclass(frozen=True, slots=True)
class ResetConfig:
    # argv; {uuid}, {index} and {pci_bus_id} are replaced, never through a shell
    command: tuple[str, ...] = ("nvidia-smi", "--gpu-reset", "-i", "{uuid}")
    timeout_s: float = 120.0
    max_per_gpu_per_day: int = 3
    probation_s: float = 60.0


@dataclass(frozen=True, slots=True)
class JobsConfig:
    checkpoint_signal: str = "SIGUSR1"
    checkpoint_grace_s: float = 60.0
    stop_timeout_s: float = 30.0
    max_restarts: int = 10
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 300.0
    stable_after_s: float = 600.0  # a run this long resets the crash backoff
    migrate_on_degraded: bool = True
    snapshots_keep: int = 5
    snapshots_max_bytes: int = 20 * 1024**3
    # processes gpuguard did not start that are never sent the checkpoint signal,
    # by process name (or basename of the executable or argv[0]); others get it
    # only when they handle it (/proc/PID/status SigCgt)
    foreign_never_signal: tuple[str, ...] = (
        "nv-hostengine",
        "dcgm-exporter",
        "dcgmi",
        "nvidia-persistenced",
        "nvidia-smi",
        "nvidia-fabricmanager",
        "nv-fabricmanager",
    )


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Prometheus exposition; off by default and bound to localhost when on."""

    enabled: bool = False
    address: str = "127.0.0.1"
    port: int = 9402


@dataclass(frozen=True, slots=True)
class HooksConfig:
    """Commands run when the node turns unhealthy or recovers: argv lists
    with placeholders ({hostname}, {reason}, {gpus}, {uuids}, {state}), never a shell string."""

    on_unhealthy: tuple[str, ...] = ()
    on_recovered: tuple[str, ...] = ()
    timeout_s: float = 30.0


@dataclass(frozen=True, slots=True)
class JobEntry:
    """One `[[job]]` table: the blueprint of a managed job."""

    name: str
    command: tuple[str, ...] = ()
    # instead of a command: `gpuguard-yolo train` with these arguments (KEY = value);
    # save_every_s among them is gpuguard-yolo's own --save-every-s
    yolo: tuple[tuple[str, str], ...] = ()
    workdir: Path | None = None
    env: tuple[tuple[str, str], ...] = ()
    user: str | None = None
    gpus: int = 1
    min_gpus: int | None = None
    checkpoint: Path | None = None
    max_restarts: int | None = None  # None: [jobs] max_restarts


@dataclass(frozen=True, slots=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    reset: ResetConfig = field(default_factory=ResetConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    job: tuple[JobEntry, ...] = ()
    source: Path | None = None  # the file it came from; None for built-in defaults


class ConfigError(ValueError):
    """A config problem, worded for the operator: file, key, what is wrong."""

    def __init__(self, path: Path | str | None, key: str | None, problem: str) -> None:
        where = str(path) if path else "<config>"
        super().__init__(f"{where}: {key}: {problem}" if key else f"{where}: {problem}")
        self.path = path
        self.key = key
        self.problem = problem


# ---------------------------------------------------------------- the loader

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "console", "json")
# variables gpuguard sets for every job (CONTRACT.md); a [[job]] env cannot set them
RESERVED_ENV = "CUDA_VISIBLE_DEVICES"
YOLO_SAVE_EVERY = "save_every_s"  # in [[job]] yolo = {...}: gpuguard-yolo's --save-every-s, not a `yolo train` key
# counts for which 0 makes no sense
_AT_LEAST_ONE = frozenset({"gpus", "min_gpus", "snapshots_keep", "snapshots_max_bytes", "event_retention_max_rows"})


class _Problem(Exception):
    """A problem at a dotted key, before the file's name is attached."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(key, problem)
        self.key = key
        self.problem = problem


def load(path: Path | None = None) -> Config:
    """The config from `path`, or from DEFAULT_CONFIG_PATH when that exists, else the defaults.

    A missing default file is normal (built-in defaults); a missing explicit
    file is the operator's mistake and an error.
    """
    source = DEFAULT_CONFIG_PATH if path is None else path
    try:
        with source.open("rb") as f:
            problem = unsafe_owner_or_mode(os.fstat(f.fileno())) or _unsafe_directory(source.parent)
            if problem:
                raise ConfigError(source, None, f"refusing a config that others can change: {problem}")
            raw = f.read()
    except FileNotFoundError:
        if path is None:
            return Config()
        raise ConfigError(source, None, "no such file") from None
    except OSError as exc:
        raise ConfigError(source, None, f"cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(source, None, f"not UTF-8 (line {line}, byte {exc.start})") from None
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, None, f"invalid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses once per nesting level
        raise ConfigError(source, None, "invalid TOML: arrays or tables nested too deeply") from None
    try:
        config = replace(_build(Config, table, ""), source=source)
    except _Problem as exc:
        raise ConfigError(source, exc.key, exc.problem) from None
    first = next(_problems(config), None)
    if first is not None:
        raise ConfigError(source, *first)
    return config


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


def _unsafe_directory(directory: Path) -> str | None:
    """Whoever may write the config's directory may replace the config."""
    try:
        st = os.stat(directory)
    except OSError:
        return None  # the file opened, so the directory exists; a stat refused here tells nothing new
    problem = unsafe_owner_or_mode(st, sticky_ok=True)
    return f"its directory {directory} is {problem}" if problem else None


def with_overrides(config: Config, *, state_dir: Path | None = None, socket: Path | None = None) -> Config:
    """The config with gpuguardd's --state-dir/--socket applied over the file's values."""
    daemon = config.daemon
    if state_dir is not None:
        daemon = replace(daemon, state_dir=state_dir)
    if socket is not None:
        daemon = replace(daemon, socket=socket)
    return replace(config, daemon=daemon)


# -- TOML values to typed fields, driven by the dataclasses' type hints


def _build(cls: type[_T], value: object, key: str) -> _T:
    """One dataclass from a TOML table: every key known, every required field present."""
    if not isinstance(value, dict):
        raise _Problem(key, f"expected a table, got {_describe(value)}")
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if not (cls is Config and f.name == "source")}
    for name in value:
        if name not in known:
            raise _Problem(_join(key, name), _unknown(name, known, is_section=not key and isinstance(value[name], dict)))
    kwargs: dict[str, Any] = {}
    for name, f in known.items():
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], _join(key, name))
        elif f.default is MISSING and f.default_factory is MISSING:
            raise _Problem(_join(key, name), "missing; this key is required")
    return cls(**kwargs)


def _convert(hint: Any, value: object, key: str) -> Any:
    """A TOML value as the field's type, or a _Problem saying what was expected."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is UnionType:  # `X | None`: TOML has no null, so a present key holds an X
        (inner,) = (arg for arg in args if arg is not type(None))
        return _convert(inner, value, key)
    if is_dataclass(hint):
        return _build(hint, value, key)
    if origin is tuple and args[1:] == (Ellipsis,):
        return _convert_tuple(args[0], value, key)
    if hint in _SCALARS:
        expected, accepts, make = _SCALARS[hint]
        if not accepts(value):
            raise _Problem(key, f"expected {expected}, got {_describe(value)}")
        return make(value)
    raise TypeError(f"config field {key} has a type the loader does not know: {hint}")


def _convert_tuple(item: Any, value: object, key: str) -> tuple[Any, ...]:
    """Arrays of strings (argv), tables of strings (env) and arrays of tables ([[job]])."""
    if item is str:
        if isinstance(value, str) and key.endswith("command"):
            raise _Problem(key, f"expected an argv list of strings, never a shell string; got {_describe(value)}")
        if not isinstance(value, list):
            raise _Problem(key, f"expected an array of strings, got {_describe(value)}")
        return tuple(_convert(str, element, f"{key}[{i}]") for i, element in enumerate(value))
    if item == tuple[str, str]:
        if key.endswith(".yolo"):  # training arguments: any TOML scalar, as `yolo train` takes it
            if not isinstance(value, dict):
                raise _Problem(key, f"expected a table of training arguments, got {_describe(value)}")
            return tuple(sorted((name, _yolo_value(v, _join(key, name))) for name, v in value.items()))
        if not isinstance(value, dict):
            raise _Problem(key, f"expected a table of strings, got {_describe(value)}")
        return tuple(sorted((name, _convert(str, text, _join(key, name))) for name, text in value.items()))
    if is_dataclass(item):
        if not isinstance(value, list):
            raise _Problem(key, f"expected an array of tables ([[{key}]]), got {_describe(value)}")
        return tuple(_build(item, element, f"{key}[{i}]") for i, element in enumerate(value))
    raise TypeError(f"config field {key} has a tuple type the loader does not know: tuple[{item}, ...]")


def _yolo_value(value: object, key: str) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, str | int | float):
        return str(value)
    raise _Problem(key, f"expected a string, number or boolean, got {_describe(value)}")


def _non_negative_number(text: str) -> bool:
    try:
        return float(text) >= 0
    except ValueError:
        return False


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_mode(value: object) -> bool:
    return _is_int(value) or (isinstance(value, str) and 1 <= len(value) <= 4 and set(value) <= set("01234567"))


def _mode(value: int | str) -> FileMode:
    return FileMode(int(value, 8) if isinstance(value, str) else value)


def _is_path(value: object) -> bool:
    return isinstance(value, str) and value != "" and "\0" not in value


# field type -> (what the message says is expected, the test, the conversion)
_SCALARS: dict[Any, tuple[str, Callable[[object], bool], Callable[[Any], Any]]] = {
    bool: ("true or false", lambda v: isinstance(v, bool), bool),
    int: ("an integer", _is_int, int),
    float: ("a number", _is_number, float),
    str: ("a string", lambda v: isinstance(v, str), str),
    Path: ("a non-empty path string", _is_path, Path),
    FileMode: ('an octal mode such as "0660" or 0o660', _is_mode, _mode),
}


def _describe(value: object) -> str:
    """A TOML value as the operator wrote it: its TOML type and, for scalars, the value."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return f"string {json.dumps(shown)}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return f"date/time {value}"


def _unknown(name: str, known: dict[str, Any], *, is_section: bool) -> str:
    """'unknown key', with the closest known name when there is a close one."""
    what = "unknown section" if is_section else "unknown key"
    close = difflib.get_close_matches(name, list(known), n=1)
    return f'{what}; did you mean "{close[0]}"?' if close else what


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# -- value checks: all of them here, in one place


def _problems(config: Config) -> Iterator[tuple[str, str]]:
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


def _leaves(obj: Any, key: str) -> Iterator[tuple[str, object]]:
    """(dotted key, value) for every field below the dataclass `obj`, jobs as job[i]."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        sub = _join(key, f.name)
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
