"""Reading the config: TOML in, a frozen typed Config out, or a ConfigError.

Unknown keys and wrong types are errors that name the file, the key and what
is wrong, with the closest known key when there is one, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
from collections.abc import Callable
from dataclasses import MISSING, fields, is_dataclass, replace
from pathlib import Path
from types import UnionType
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

from gpuguard.config.checks import problems, unsafe_directory, unsafe_owner_or_mode
from gpuguard.config.schema import Config, FileMode

DEFAULT_CONFIG_PATH = Path("/etc/gpuguard/config.toml")

_T = TypeVar("_T")


class ConfigError(ValueError):
    """A config problem, worded for the operator: file, key, what is wrong."""

    def __init__(self, path: Path | str | None, key: str | None, problem: str) -> None:
        where = str(path) if path else "<config>"
        super().__init__(f"{where}: {key}: {problem}" if key else f"{where}: {problem}")
        self.path = path
        self.key = key
        self.problem = problem


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
            problem = unsafe_owner_or_mode(os.fstat(f.fileno())) or unsafe_directory(source.parent)
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
    first = next(problems(config), None)
    if first is not None:
        raise ConfigError(source, *first)
    return config


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
            is_section = not key and isinstance(value[name], dict)
            # a plain value at the top is never a misspelt section (source = ... is not [storage])
            like = {n: f for n, f in known.items() if key or is_section or not is_dataclass(hints[n])}
            raise _Problem(_join(key, name), _unknown(name, like, is_section=is_section))
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
    """A training argument as the text `yolo train KEY=value` takes; booleans as Python spells them."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, str | int | float):
        return str(value)
    raise _Problem(key, f"expected a string, number or boolean, got {_describe(value)}")


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
