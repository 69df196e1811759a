"""Event: the contract's JSON shape and value semantics."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from gpuguard.events import Event, EventKind, iso_utc
from gpuguard.health.types import Severity

TS = datetime(2026, 11, 27, 7, 15, 3, 123000, tzinfo=UTC).timestamp()


def test_to_json_has_the_contract_keys_with_iso_utc_ms() -> None:
    e = Event(kind="gpu_excluded", severity=Severity.WARNING, message="out", gpu="GPU-1", ts=TS, id=7)
    assert e.to_json() == {
        "id": 7,
        "ts": "2026-11-27T07:15:03.123Z",
        "kind": "gpu_excluded",
        "severity": "warning",
        "gpu": "GPU-1",
        "job": None,
        "message": "out",
    }
    json.dumps(e.to_json())  # JSON-able as is


def test_xid_only_when_set() -> None:
    xid = Event(kind=EventKind.XID, severity=Severity.CRITICAL, message="Xid 79", gpu="GPU-1", xid=79, ts=TS)
    other = Event(kind=EventKind.THERMAL, severity=Severity.WARNING, message="hot", ts=TS)
    assert xid.to_json()["xid"] == 79
    assert "xid" not in other.to_json()


def test_data_is_merged_but_never_replaces_fixed_keys() -> None:
    e = Event(
        kind="xid",
        severity=Severity.ERROR,
        message="m",
        xid=13,
        data={"pci_bus_id": "0000:3b:00", "kind": "spoof", "ts": 0, "xid": 1, "id": 99, "pid": None},
        ts=TS,
    )
    out = e.to_json()
    assert out["pci_bus_id"] == "0000:3b:00" and out["pid"] is None
    assert (out["kind"], out["ts"], out["xid"], out["id"]) == ("xid", "2026-11-27T07:15:03.123Z", 13, None)


def test_iso_utc_rounds_to_milliseconds_and_uses_z() -> None:
    assert iso_utc(0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(TS + 0.0004) == "2026-11-27T07:15:03.123Z"


def test_values_are_normalised_and_data_is_a_read_only_copy() -> None:
    data = {"a": 1}
    e = Event(kind=EventKind.HANG, severity="error", message="m", data=data)  # type: ignore[arg-type]
    data["a"] = 2
    assert type(e.kind) is str and e.kind == "hang"
    assert e.severity is Severity.ERROR
    assert e.data["a"] == 1
    with pytest.raises(TypeError):
        e.data["b"] = 3  # type: ignore[index]
    with pytest.raises(ValueError):
        Event(kind="x", severity="fatal", message="m")  # type: ignore[arg-type]


def test_hashable_and_equality_ignores_data() -> None:
    a = Event(kind="ecc", severity=Severity.ERROR, message="m", data={"n": 1}, ts=1.0)
    b = Event(kind="ecc", severity=Severity.ERROR, message="m", data={"n": 2}, ts=1.0)
    assert a == b and len({a, b}) == 1


def test_event_kinds_cover_the_contract() -> None:
    contract = {
        "xid", "ecc", "remap", "hang", "gpu_lost", "thermal", "gpu_excluded", "gpu_included", "gpu_reset",
        "job_started", "checkpoint_requested", "job_restarted", "job_succeeded", "job_failed", "job_stopped",
    }  # fmt: skip
    assert contract <= {k.value for k in EventKind}
