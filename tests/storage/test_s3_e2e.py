"""The s3:// store against a real S3 server (SeaweedFS, lab/s3.py), in process and end to end."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from gpuguard.events import EventKind
from gpuguard.storage.s3store import S3Store
from gpuguard.storage.uploader import Uploader
from gpuguard.storage.url import parse_url
from harness import wait_until
from lab.s3 import SeaweedS3
from tests.storage.fakes import Events, snap_id, snapshot_file
from tests.storage.nodes import node, run_writer, second_node_resumes, start_refused, stop_all

pytestmark = pytest.mark.e2e


class WatchedS3(S3Store):
    """The real store, telling when a put begins (to cut it off mid-way)."""

    def __init__(self, url: str) -> None:
        super().__init__(parse_url(url), connect_timeout_s=1.0)
        self.putting = threading.Event()

    def put(self, job: str, snapshot_id: str, path: Path, sha256: str, created: float) -> None:
        self.putting.set()
        super().put(job, snapshot_id, path, sha256, created)


def test_put_list_get_delete_with_the_sha256_as_metadata(bucket: str, tmp_path: Path) -> None:
    store = S3Store(parse_url(f"s3://{bucket}/team"))
    store.check()
    for n in (1, 2):
        path, sha = snapshot_file(tmp_path / f"{n}.pt", n)
        store.put("yolo", snap_id(n), path, sha, 1000.0 + n)
    listed = store.list("yolo")
    assert [s.id for s in listed] == [snap_id(2), snap_id(1)]
    assert listed[0].url == f"s3://{bucket}/team/yolo/{snap_id(2)}.pt"
    assert listed[0].sha256 == hashlib.sha256((tmp_path / "2.pt").read_bytes()).hexdigest()
    store.get(listed[1], tmp_path / "back.pt")
    assert (tmp_path / "back.pt").read_bytes() == (tmp_path / "1.pt").read_bytes()
    store.delete("yolo", snap_id(1))
    assert [s.id for s in store.list("yolo")] == [snap_id(2)]


@pytest.mark.slow
def test_an_upload_cut_off_by_killing_the_server_is_done_again(seaweed: SeaweedS3, bucket: str, tmp_path: Path) -> None:
    big = tmp_path / "big.pt"
    with big.open("wb") as f:  # 200 MB: several parts, long enough to be cut off
        for _ in range(200):
            f.write(os.urandom(1024 * 1024))
    sha = hashlib.sha256(big.read_bytes()).hexdigest()
    store = WatchedS3(f"s3://{bucket}")
    seen = Events()
    up = Uploader(store, seen, keep_newest=3, fetch_timeout_s=10.0, retry_initial_s=0.2, retry_max_s=1.0)
    up.start()
    try:
        data = seaweed.workdir / "data"
        before = _bytes_under(data)
        up.offer("big", snap_id(1), big, sha, 1.0)
        wait_until(store.putting.is_set, 30.0, "the upload to begin")
        wait_until(lambda: _bytes_under(data) > before + 16 * 1024 * 1024, 60.0, "part of it to reach the server")
        seaweed.kill()
        wait_until(lambda: EventKind.STORAGE_UNAVAILABLE in seen.kinds(), 60.0, "the outage reported")
        assert not up.wait_stored("big", snap_id(1), 0.1)
        seaweed.restart()
        assert up.wait_stored("big", snap_id(1), 120.0)
    finally:
        up.close()
    assert seen.kinds() == [EventKind.STORAGE_UNAVAILABLE, EventKind.STORAGE_RECOVERED, EventKind.SNAPSHOT_UPLOADED]
    (stored,) = store.list("big")
    assert stored.sha256 == sha and stored.size == big.stat().st_size
    store.get(stored, tmp_path / "back.pt")
    assert hashlib.sha256((tmp_path / "back.pt").read_bytes()).hexdigest() == sha


def test_a_second_daemon_resumes_from_the_stored_snapshot(bucket: str, tmp_path: Path) -> None:
    second_node_resumes(tmp_path, f"s3://{bucket}/nodes")


def test_a_missing_bucket_stops_the_daemon_at_start(bucket: str, tmp_path: Path) -> None:
    code, out = start_refused(node(tmp_path, "a", "s3://no-such-bucket-here/x"))
    assert code == 2 and "storage.url" in out and "bucket 'no-such-bucket-here' does not exist" in out


def test_wrong_credentials_stop_the_daemon_at_start_and_are_never_shown(bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = "WRONGSECRETMARKER0123456789abcdef"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", marker)
    code, out = start_refused(node(tmp_path, "a", f"s3://{bucket}/x"))
    assert code == 2 and "storage.url" in out and "access denied" in out
    assert marker not in out


@pytest.mark.slow
def test_an_outage_at_run_time_gives_events_and_no_secret_anywhere(seaweed: SeaweedS3, bucket: str, tmp_path: Path) -> None:
    """The daemon runs on while the server is killed; the secret it uses appears in no
    event, log line or status."""
    secret = seaweed.secret_key
    a = node(tmp_path, "a", f"s3://{bucket}/run", upload_retry_max_s=1.0)
    try:
        a.start()
        seaweed.kill()
        run_writer(a, "train", tmp_path / "wa", 5)
        wait_until(lambda: "storage_unavailable" in a.kinds(), 60.0, "the outage reported")
        assert "snapshot_saved" in a.kinds("train")
        assert a.status()["jobs"][0]["state"] == "running"
        seaweed.restart()
        wait_until(lambda: "snapshot_uploaded" in a.kinds("train"), 120.0, "the upload once the server is back")
        assert "storage_recovered" in a.kinds()
        shown = [str(a.events()), a.ctl("status", "--json").stdout, a.ctl("snapshots", "train", "--json").stdout]
    finally:
        stop_all(a)
    shown.append(a.log.read_text())
    assert all(secret not in text for text in shown)
    assert "storage_unavailable" in shown[3]  # the log has the event too


def _bytes_under(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_a_bucket_deleted_at_run_time_gives_an_event_then_uploads_when_it_is_back(seaweed: SeaweedS3, bucket: str, tmp_path: Path) -> None:
    seen = Events()
    up = Uploader(S3Store(parse_url(f"s3://{bucket}/x")), seen, keep_newest=3, fetch_timeout_s=10.0, retry_initial_s=0.1, retry_max_s=0.5)
    up.start()
    try:
        seaweed.client().delete_bucket(Bucket=bucket)
        path, sha = snapshot_file(tmp_path / "1.pt", 1)
        up.offer("yolo", snap_id(1), path, sha, 1.0)
        (down,) = wait_until(lambda: seen.of(EventKind.STORAGE_UNAVAILABLE), 30.0, "the missing bucket reported")
        assert f"[storage] url s3://{bucket}/x" in down.message and "NoSuchBucket" in down.message
        seaweed.make_bucket(bucket)
        assert up.wait_stored("yolo", snap_id(1), 30.0)
    finally:
        up.close()
