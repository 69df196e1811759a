"""The human status table's standby and storage lines (the rest: tests/test_ctl.py through the CLI)."""

from __future__ import annotations

from typing import Any

from gpuguard.ctl.status_table import format_status

DAEMON = {"version": "0.1.0", "backend": "simulated", "uptime_s": 61, "pid": 42}
JOB = {"name": "train", "state": "running", "gpus": [], "attempt": 1, "restarts": 0, "pid": 7, "checkpoint": None}


def status(storage: dict[str, Any] | None = None, standby: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"daemon": {**DAEMON, "storage": storage}, "gpus": [], "jobs": [{**JOB, "standby": standby}]}


def test_a_warm_standby_and_the_storage_each_get_a_line() -> None:
    out = format_status(status(
        {"url": "s3://ckpt/node1", "available": True, "problem": None, "pending_uploads": 0},
        {"pid": 888, "state": "waiting", "since": 1.0},
    ))  # fmt: skip
    *_, standby, _, daemon, storage = out.splitlines()
    assert standby == "train: warm standby pid 888 waiting"
    assert daemon == "daemon: gpuguardd 0.1.0, backend simulated, pid 42, up 1m01s"
    assert storage == "storage: s3://ckpt/node1, available, 0 upload(s) pending"


def test_an_unavailable_store_says_why_and_no_standby_no_storage_no_lines() -> None:
    out = format_status(status({"url": "file:///nfs/ckpt", "available": False, "problem": "No such bucket",
                                "pending_uploads": 3}))  # fmt: skip
    assert out.splitlines()[-1] == "storage: file:///nfs/ckpt, UNAVAILABLE (No such bucket), 3 upload(s) pending"
    assert "standby" not in out
    plain = format_status(status())
    assert plain.splitlines()[-1].startswith("daemon: ") and "storage" not in plain and "standby" not in plain
