"""EventStore against real SQLite files in tmp_path."""

from __future__ import annotations

import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gpuguard.events import Event
from gpuguard.health.types import Severity
from gpuguard.store import SCHEMA_VERSION, EventStore, QuarantineEntry, StoreError


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "gpuguard.db"


@pytest.fixture
def store(path: Path) -> Iterator[EventStore]:
    s = EventStore(path)
    yield s
    s.close()


def ev(n: int = 0, kind: str = "xid", gpu: str | None = None, job: str | None = None, **kw: Any) -> Event:
    kw.setdefault("ts", 1000.0)
    return Event(kind=kind, severity=Severity.ERROR, message=f"event {n}", gpu=gpu, job=job, **kw)


def messages(events: list[Event]) -> list[str]:
    return [e.message for e in events]


# --- the file ------------------------------------------------------------


def test_creates_parent_and_a_private_wal_database(store: EventStore, path: Path) -> None:
    store.append(ev())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(Path(f"{path}-wal").stat().st_mode) == 0o600
    other = sqlite3.connect(path)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        other.close()
    assert store.size_bytes() >= path.stat().st_size > 0


def test_events_persist_across_close_and_reopen(path: Path) -> None:
    s = EventStore(path)
    first = s.append(ev(1, gpu="GPU-a", xid=79, data={"pci_bus_id": "0000:3b:00"}))
    s.close()
    s.close()  # twice is fine
    s = EventStore(path)
    try:
        [again] = s.events()
        assert again == first and again.id == first.id and again.data == {"pci_bus_id": "0000:3b:00"}
        assert s.append(ev(2)).id == first.id + 1  # type: ignore[operator]
    finally:
        s.close()


def test_a_closed_store_says_so(path: Path) -> None:
    s = EventStore(path)
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.events()


def test_corrupt_file_is_moved_aside_and_a_fresh_one_started(path: Path) -> None:
    path.parent.mkdir()
    path.write_bytes(b"this is not a database" * 200)
    with capture_logs() as logs:
        s = EventStore(path)
    try:
        assert s.events() == [] and s.append(ev()).id == 1
    finally:
        s.close()
    [aside] = path.parent.glob("gpuguard.db.corrupt-*")
    assert aside.read_bytes() == b"this is not a database" * 200
    [report] = [entry for entry in logs if entry["event"] == "store_corrupt"]
    assert report["log_level"] == "error" and report["moved_to"] == str(aside) and report["path"] == str(path)


def test_corrupt_pages_keep_quarantine_and_jobs(path: Path) -> None:
    s = EventStore(path)
    s.exclude("GPU-bad", "Xid 79", by="root", ts=5.0)
    s.put_job("train", {"state": "running", "attempt": 2})
    for n in range(300):
        s.append(ev(n, data={"pad": "x" * 200}))
    s.close()
    page = 4096
    with open(path, "r+b") as f:  # the last page holds events, not quarantine
        f.seek(path.stat().st_size - page)
        f.write(b"\xff" * page)
    s = EventStore(path)
    try:
        assert s.events() == []
        assert s.excluded() == {"GPU-bad": QuarantineEntry("GPU-bad", "Xid 79", "root", 5.0)}
        assert s.get_job("train") == {"state": "running", "attempt": 2}
    finally:
        s.close()
    assert len(list(path.parent.glob("gpuguard.db.corrupt-*"))) == 1


def test_a_newer_schema_is_refused_untouched(path: Path) -> None:
    path.parent.mkdir()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match=str(path)):
        EventStore(path)
    assert list(path.parent.iterdir()) == [path]


# --- events --------------------------------------------------------------


def test_append_sets_ids_and_query_is_newest_last_within_limit(store: EventStore) -> None:
    stored = [store.append(ev(n)) for n in range(10)]
    assert [e.id for e in stored] == list(range(1, 11))
    assert messages(store.events(limit=3)) == ["event 7", "event 8", "event 9"]
    assert len(store.events(limit=None)) == 10
    assert store.events(limit=0) == []


def test_query_filters(store: EventStore) -> None:
    store.append(ev(0, gpu="GPU-a"))
    store.append(ev(1, gpu="GPU-b", job="train"))
    store.append(ev(2, kind="job_started", job="train"))
    store.append(ev(3, kind="thermal", gpu="GPU-a"))
    assert messages(store.events(gpu="GPU-a")) == ["event 0", "event 3"]
    assert messages(store.events(job="train")) == ["event 1", "event 2"]
    assert messages(store.events(kinds=["thermal", "job_started"])) == ["event 2", "event 3"]
    assert store.events(kinds=[]) == []
    assert messages(store.events(since_id=2)) == ["event 2", "event 3"]
    assert messages(store.events(gpu="GPU-a", kinds=["xid"], since_id=0)) == ["event 0"]
    assert messages(store.events(limit=1, job="train")) == ["event 2"]


def test_concurrent_appends_from_eight_threads(store: EventStore) -> None:
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            for n in range(100):
                store.append(ev(n, job=f"t{t}"))
                if n % 25 == 0:
                    store.events(limit=10, job=f"t{t}")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and store.backlog == 0
    found = store.events(limit=None)
    assert len(found) == 800 and len({e.id for e in found}) == 800
    for t in range(8):
        assert messages(store.events(limit=None, job=f"t{t}")) == [f"event {n}" for n in range(100)]


# --- retention -----------------------------------------------------------


def test_prune_by_age_then_by_rows(store: EventStore) -> None:
    for n in range(10):
        store.append(ev(n, ts=1000.0 + n))
    assert store.prune(max_age_s=5, max_rows=100, now=1010.0) == 5  # ts < 1005 go
    assert messages(store.events())[0] == "event 5"
    assert store.prune(max_age_s=1e9, max_rows=2, now=1010.0) == 3
    assert messages(store.events()) == ["event 8", "event 9"]
    assert store.prune(max_age_s=1e9, max_rows=2, now=1010.0) == 0
    assert store.append(ev(10)).id == 11  # ids are never reused
    assert store.prune(max_age_s=1e9, max_rows=0, now=1010.0) == 3
    assert store.events() == []


def test_prune_by_rows_with_gaps_in_ids(store: EventStore) -> None:
    for n in range(6):
        store.append(ev(n, ts=1.0 if n % 2 else 2000.0))
    assert store.prune(max_age_s=100, max_rows=10, now=2000.0) == 3  # ids 1, 3, 5 remain
    assert store.prune(max_age_s=100, max_rows=3, now=2000.0) == 0
    assert store.prune(max_age_s=100, max_rows=2, now=2000.0) == 1
    assert messages(store.events()) == ["event 2", "event 4"]


# --- quarantine ----------------------------------------------------------


def test_quarantine_persists_and_survives_prune(path: Path) -> None:
    s = EventStore(path)
    s.exclude("GPU-a", "Xid 79", by="uid 0", ts=10.0)
    s.exclude("GPU-b", "flaky", by="supervisor", ts=11.0)
    s.exclude("GPU-b", "ECC DBE", by="health", ts=12.0)  # again: the new reason wins
    s.append(ev(kind="gpu_excluded", gpu="GPU-a"))
    assert s.prune(max_age_s=0, max_rows=0) == 1
    s.close()
    s = EventStore(path)
    try:
        assert s.excluded() == {
            "GPU-a": QuarantineEntry("GPU-a", "Xid 79", "uid 0", 10.0),
            "GPU-b": QuarantineEntry("GPU-b", "ECC DBE", "health", 12.0),
        }
        assert s.include("GPU-a") is True
        assert s.include("GPU-a") is False
        assert list(s.excluded()) == ["GPU-b"]
    finally:
        s.close()


# --- jobs ----------------------------------------------------------------


def test_job_records_round_trip(path: Path) -> None:
    s = EventStore(path)
    record = {"state": "running", "gpus": ["GPU-a"], "attempt": 1, "checkpoint": path, "pid": None}
    s.put_job("train", record)
    s.put_job("eval", {"state": "waiting"})
    s.put_job("train", {**record, "state": "backoff", "attempt": 2})
    with pytest.raises(ValueError, match="state"):
        s.put_job("bad", {"attempt": 1})
    s.close()
    s = EventStore(path)
    try:
        assert s.get_job("train") == {**record, "checkpoint": str(path), "state": "backoff", "attempt": 2}
        assert [j["state"] for j in s.jobs()] == ["waiting", "backoff"]  # by name
        assert s.get_job("missing") is None
        assert s.delete_job("eval") is True and s.delete_job("eval") is False
        assert [j["state"] for j in s.jobs()] == ["backoff"]
    finally:
        s.close()


# --- a failing disk ------------------------------------------------------


def _fill_disk(store: EventStore) -> None:
    """Cap the database at the pages it has: the next new page is 'disk full'."""
    conn = store._conn
    assert conn is not None
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")


def _free_disk(store: EventStore) -> None:
    assert store._conn is not None
    store._conn.execute("PRAGMA max_page_count = 1073741823")


def test_disk_full_keeps_events_in_the_backlog_and_flushes_later(store: EventStore) -> None:
    store.append(ev(0))
    _fill_disk(store)
    big = {"pad": "x" * 8000}
    with capture_logs() as logs:
        waiting = [store.append(ev(n, gpu="GPU-a", data=big)) for n in range(1, 4)]
    assert [e.id for e in waiting] == [None, None, None]
    assert store.backlog == 3
    failures = [entry for entry in logs if entry["event"] == "store_write_failed"]
    assert len(failures) == 1 and "full" in failures[0]["error"]  # logged once, not per event
    assert messages(store.events()) == ["event 0", "event 1", "event 2", "event 3"]
    assert messages(store.events(gpu="GPU-a", limit=2)) == ["event 2", "event 3"]
    with pytest.raises(StoreError, match="full"):
        store.exclude("GPU-a", "x" * 8000, by="op")

    _free_disk(store)
    with capture_logs() as logs:
        last = store.append(ev(4))
    assert last.id == 5 and store.backlog == 0
    assert [e.id for e in store.events()] == [1, 2, 3, 4, 5]
    assert messages(store.events()) == [f"event {n}" for n in range(5)]
    assert [entry["event"] for entry in logs] == ["store_writable_again"]


def test_read_only_database_backlog_is_written_on_close(path: Path) -> None:
    s = EventStore(path)
    assert s._conn is not None
    s._conn.execute("PRAGMA query_only = 1")
    assert s.append(ev(1)).id is None
    assert s.append(ev(2)).id is None
    assert s.backlog == 2
    s._conn.execute("PRAGMA query_only = 0")
    s.close()
    s = EventStore(path)
    try:
        assert [(e.id, e.message) for e in s.events()] == [(1, "event 1"), (2, "event 2")]
    finally:
        s.close()
