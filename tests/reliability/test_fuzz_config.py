"""Fuzzing the config loader: any file gives a Config or a ConfigError that
names the file, never another exception."""

from __future__ import annotations

import datetime as dt
import json
import math
import tempfile
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuguard.config import Config, ConfigError, load, schema

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _field_names() -> tuple[list[str], list[str]]:
    """The section names and every key name the loader knows, so documents reach the value checks."""
    sections = [f.name for f in fields(Config) if f.name != "source"]
    keys = sorted(
        {f.name for obj in vars(schema).values() if isinstance(obj, type) and is_dataclass(obj) for f in fields(obj)}
    )
    return sections, keys


SECTIONS, KEYS = _field_names()
NAMES = st.one_of(st.sampled_from(KEYS), st.text(max_size=12))

SCALARS = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.integers(-5, 100_000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=20),
    st.sampled_from(["SIGUSR1", "SIGKILL", "usr1", "0660", "9999", "/tmp/x", "", "{uuid}", "{nope}", "{", "json", "debug"]),
    st.datetimes(min_value=dt.datetime(1970, 1, 1)),
    st.dates(),
)
# mostly scalars: the loader's type and value checks are where the cases are; one level of nesting beside
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(NAMES, SCALARS, max_size=3))


def toml_value(value: Any) -> str:
    """One TOML value, inline (strings and keys as JSON-escaped basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)} = {toml_value(v)}" for k, v in value.items()) + "}"


SECTION_TABLES = st.dictionaries(st.one_of(st.sampled_from(SECTIONS), st.text(max_size=8)), st.dictionaries(NAMES, VALUES, max_size=5), max_size=4)
JOBS = st.lists(
    st.fixed_dictionaries(
        {"name": st.one_of(st.sampled_from(["a", "b", "train"]), st.text(max_size=6)),
         "command": st.one_of(st.lists(st.text(max_size=6), max_size=3), SCALARS)},
        optional={k: VALUES for k in ("workdir", "gpus", "min_gpus", "checkpoint", "env", "user", "max_restarts")},
    ),
    max_size=3,
)


def _load_bytes(raw: bytes) -> Config | ConfigError:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.toml"
        path.write_bytes(raw)
        try:
            return load(path)
        except ConfigError as exc:
            assert str(path) in str(exc), str(exc)
            return exc


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_give_a_config_or_a_config_error(raw: bytes) -> None:
    assert isinstance(_load_bytes(raw), Config | ConfigError)


@FUZZ
@given(SECTION_TABLES, JOBS)
def test_random_documents_give_a_config_or_a_config_error(tables: dict[str, dict[str, Any]], jobs: list[dict[str, Any]]) -> None:
    lines = [f"{json.dumps(name, ensure_ascii=False)} = {toml_value(table)}" for name, table in tables.items()]
    if jobs:
        lines.append(f"job = {toml_value(jobs)}")
    outcome = _load_bytes("\n".join(lines).encode())
    assert isinstance(outcome, Config | ConfigError)
    if isinstance(outcome, ConfigError):
        assert outcome.problem


def test_deep_nesting_is_a_config_error(tmp_path: Path) -> None:
    """Regression: tomllib recurses per level, so this raised RecursionError."""
    path = tmp_path / "config.toml"
    path.write_text("a = " + "[" * 5000)
    try:
        load(path)
    except ConfigError as exc:
        assert str(path) in str(exc) and "nested too deeply" in str(exc)
    else:
        raise AssertionError("loaded a document nested 5000 deep")
