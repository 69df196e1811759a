"""The uploader: in the background, retried with back-off while the store is down (one
event per outage), the store's retention follows the ring's, and no secret in a message."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import pytest

from gpuguard.events import EventKind
from gpuguard.storage.s3store import S3Store
from gpuguard.storage.uploader import Uploader, retry_delays
from gpuguard.storage.url import parse_url
from gpuguard.supervisor.ports import StorageUnavailable
from harness import wait_until
from tests.storage.fakes import Events, FlakyStore, snap_id, snapshot_file


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def store(tmp_path: Path) -> FlakyStore:
    (tmp_path / "shared").mkdir()
    return FlakyStore(tmp_path / "shared")


@pytest.fixture
def uploader(store: FlakyStore, events: Events) -> Iterator[Uploader]:
    up = Uploader(store, events, keep_newest=2, fetch_timeout_s=5.0, retry_initial_s=0.01, retry_max_s=0.05)
    up.start()
    yield up
    up.close()


def offer(up: Uploader, tmp_path: Path, n: int, job: str = "yolo") -> str:
    path, sha = snapshot_file(tmp_path / "ring" / f"{snap_id(n)}.pt", n)
    up.offer(job, snap_id(n), path, sha, 1000.0 + n)
    return snap_id(n)


def test_an_offered_snapshot_is_uploaded_in_the_background(uploader: Uploader, store: FlakyStore, events: Events, tmp_path: Path) -> None:
    sid = offer(uploader, tmp_path, 1)
    assert uploader.wait_stored("yolo", sid, 10.0)
    assert [s.id for s in store.list("yolo")] == [sid]
    (uploaded,) = events.of(EventKind.SNAPSHOT_UPLOADED)
    assert uploaded.job == "yolo" and uploaded.data["url"] == f"{store.url}/yolo/{sid}.pt"


def test_the_store_keeps_the_newest_like_the_ring(uploader: Uploader, store: FlakyStore, tmp_path: Path) -> None:
    ids = [offer(uploader, tmp_path, n) for n in range(1, 5)]
    assert uploader.wait_stored("yolo", ids[-1], 10.0)
    wait_until(lambda: [s.id for s in store.list("yolo")] == ids[:1:-1], 10.0, "the two newest kept")


def test_a_store_that_is_down_delays_uploads_and_says_so_once(
    uploader: Uploader, store: FlakyStore, events: Events, tmp_path: Path
) -> None:
    store.down.set()
    sid = offer(uploader, tmp_path, 1)
    wait_until(lambda: store.calls >= 5, 10.0, "several retries")
    assert events.kinds().count(EventKind.STORAGE_UNAVAILABLE) == 1
    assert not uploader.wait_stored("yolo", sid, 0.05)
    assert uploader.describe()["available"] is False and uploader.describe()["pending_uploads"] == 1
    store.down.clear()  # the interrupted upload is done again once the store is back
    assert uploader.wait_stored("yolo", sid, 10.0)
    assert events.kinds() == [EventKind.STORAGE_UNAVAILABLE, EventKind.STORAGE_RECOVERED, EventKind.SNAPSHOT_UPLOADED]
    assert [s.id for s in store.list("yolo")] == [sid]
    assert uploader.describe() == {"url": str(store.url), "available": True, "problem": None, "pending_uploads": 0}


def test_content_already_stored_is_not_uploaded_again(uploader: Uploader, store: FlakyStore, tmp_path: Path) -> None:
    sid = offer(uploader, tmp_path, 1)
    assert uploader.wait_stored("yolo", sid, 10.0)
    path = tmp_path / "ring" / f"{sid}.pt"
    uploader.offer("yolo", "20261130T130000Z-000009-00000009", path, store.list("yolo")[0].sha256, 2000.0)
    assert uploader.wait_stored("yolo", "20261130T130000Z-000009-00000009", 10.0)
    assert store.puts == 1


def test_a_snapshot_pruned_before_its_upload_is_dropped(uploader: Uploader, store: FlakyStore, tmp_path: Path) -> None:
    store.down.set()
    sid = offer(uploader, tmp_path, 1)
    later = offer(uploader, tmp_path, 2)
    (tmp_path / "ring" / f"{sid}.pt").unlink()
    store.down.clear()
    assert not uploader.wait_stored("yolo", sid, 10.0)
    assert uploader.wait_stored("yolo", later, 10.0)


def test_a_snapshot_of_an_earlier_daemon_is_looked_up_in_the_store(store: FlakyStore, events: Events, tmp_path: Path) -> None:
    path, sha = snapshot_file(tmp_path / "old.pt", 1)
    store.put("yolo", snap_id(1), path, sha, 1.0)
    up = Uploader(store, events, keep_newest=2, fetch_timeout_s=5.0)
    try:
        assert up.wait_stored("yolo", snap_id(1), 5.0)
        assert not up.wait_stored("yolo", snap_id(2), 0.05)
    finally:
        up.close()


def test_credentials_never_reach_a_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An S3 endpoint that does not answer: the error names the url, never the secret."""
    marker = "SECRETMARKER0123456789abcdefSECRET"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", marker)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard: nothing listens
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    s3 = S3Store(parse_url("s3://ckpt/x"), connect_timeout_s=0.5)
    with pytest.raises(StorageUnavailable) as info:
        s3.check()
    assert "[storage] url s3://ckpt/x" in str(info.value) and marker not in str(info.value)
    assert s3._redact(f"echo {marker} back") == "echo *** back"


def test_retries_back_off_exponentially_up_to_the_limit() -> None:
    assert list(islice(retry_delays(1.0, 60.0), 9)) == [1, 2, 4, 8, 16, 32, 60, 60, 60]
