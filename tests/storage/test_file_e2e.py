"""gpuguardd with a file:// store on a directory, end to end (real daemons, simulated GPUs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import wait_until
from tests.storage.nodes import node, run_writer, second_node_resumes, snapshots, start_refused, stop_all

pytestmark = pytest.mark.e2e


def test_a_second_daemon_resumes_from_the_stored_snapshot(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    second_node_resumes(tmp_path, f"file://{shared}")
    (stored,) = list((shared / "train").glob("*.pt"))
    assert stored.with_suffix(".json").exists()


def test_a_missing_directory_stops_the_daemon_at_start(tmp_path: Path) -> None:
    code, out = start_refused(node(tmp_path, "a", f"file://{tmp_path}/nowhere"))
    assert code == 2
    assert "storage.url" in out and f"file://{tmp_path}/nowhere: no such directory" in out


def test_a_malformed_url_stops_the_daemon_at_start(tmp_path: Path) -> None:
    code, out = start_refused(node(tmp_path, "a", "nfs://server/ckpt"))
    assert code == 2 and "storage.url" in out and "s3://BUCKET/PREFIX or file:///ABSOLUTE/PATH" in out


def test_a_store_gone_at_run_time_gives_events_never_a_crash(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    a = node(tmp_path, "a", f"file://{shared}", upload_retry_max_s=0.5)
    try:
        a.start()
        shared.rename(tmp_path / "away")  # the mount is gone
        run_writer(a, "train", tmp_path / "wa", 3)
        wait_until(lambda: "storage_unavailable" in a.kinds(), 30.0, "the outage reported")
        assert "snapshot_saved" in a.kinds("train")  # local snapshots go on
        assert a.status()["daemon"]["storage"]["available"] is False
        assert [s["where"] for s in snapshots(a, "train")] == ["local"]
        (tmp_path / "away").rename(shared)
        wait_until(lambda: "snapshot_uploaded" in a.kinds("train"), 30.0, "the upload once it is back")
        assert "storage_recovered" in a.kinds()
        assert [s["where"] for s in snapshots(a, "train")] == ["both"]
        assert a.proc is not None and a.proc.poll() is None
        assert a.status()["jobs"][0]["state"] == "running"
    finally:
        stop_all(a)
