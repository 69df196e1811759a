"""Job records and quarantine kept twice (database rows and records files):
a corrupt or lost database is rebuilt from the files, a full disk loses
neither, and the newer copy wins."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gpuguard.store import EventStore, QuarantineEntry, RecordFiles, StoreError
from gpuguard.store.schema import _schema_v1

RUNNING = {"state": "running", "attempt": {"number": 1, "pid": 4242}}
BACKOFF = {"state": "backoff", "attempt": {"number": 2, "pid": None}}


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "gpuguard.db"


@pytest.fixture
def records(tmp_path: Path) -> Path:
    return tmp_path / "state" / "records"


def open_store(path: Path, records: Path) -> EventStore:
    return EventStore(path, records=records)


@pytest.fixture
def store(path: Path, records: Path) -> Iterator[EventStore]:
    s = open_store(path, records)
    yield s
    s.close()


class FullDisk:
    """The store's connection, except that every write fails as on a full disk."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.in_transaction = False

    def execute(self, sql: str, params: Any = ()) -> Any:
        if sql.startswith("BEGIN"):
            raise sqlite3.OperationalError("database or disk is full")
        return self.conn.execute(sql, params)

    def close(self) -> None:
        self.conn.close()


def fill_disk(store: EventStore) -> None:
    assert store._conn is not None
    store._conn = FullDisk(store._conn)  # type: ignore[assignment]


def db_row(path: Path, name: str) -> dict[str, Any] | None:
    conn = sqlite3.connect(path)
    try:
        row = conn.execute("SELECT record FROM jobs WHERE name = ?", (name,)).fetchone()
    finally:
        conn.close()
    return json.loads(row[0]) if row else None


def rebuilt(store: EventStore) -> list[dict[str, Any]]:
    return [e.to_json() for e in store.events(kinds=["state_rebuilt"])]


# --- the files -----------------------------------------------------------


def test_records_are_private_files_of_this_user(store: EventStore, records: Path) -> None:
    store.put_job("train", RUNNING)
    store.exclude("GPU-b", "Xid 79", by="uid 0", ts=5.0)
    job_file, quarantine = records / "jobs" / "train.json", records / "quarantine.json"
    for p in (job_file, quarantine):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600 and p.stat().st_uid == os.geteuid()
    for d in (records, records / "jobs"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    saved = json.loads(job_file.read_text())
    assert saved["name"] == "train" and saved["record"] == RUNNING
    assert json.loads(quarantine.read_text())["gpus"] == [{"uuid": "GPU-b", "reason": "Xid 79", "by": "uid 0", "ts": 5.0}]
    assert sorted(p.name for p in records.rglob("*")) == ["jobs", "quarantine.json", "train.json"]  # no temp left


def test_an_invalid_name_is_refused_before_any_path(store: EventStore, tmp_path: Path) -> None:
    for name in ("../escape", "/abs", ".hidden", "a/b", ""):
        with pytest.raises(ValueError, match="name"):
            store.put_job(name, RUNNING)
    assert not list(tmp_path.rglob("*escape*")) and store.jobs() == []


def test_first_start_says_nothing_and_writes_the_files_of_an_older_database(path: Path, records: Path) -> None:
    s = EventStore(path)  # a database without records files
    s.put_job("old", RUNNING)
    s.exclude("GPU-a", "bad", by="op", ts=1.0)
    s.close()
    s = open_store(path, records)
    try:
        assert rebuilt(s) == []
        assert json.loads((records / "jobs" / "old.json").read_text())["record"] == RUNNING
        assert "GPU-a" in (RecordFiles(records).quarantine() or pytest.fail("no quarantine file")).entries
    finally:
        s.close()


def test_a_version_1_database_keeps_its_rows_and_gets_its_files(path: Path, records: Path) -> None:
    path.parent.mkdir()
    conn = sqlite3.connect(path)
    _schema_v1(conn)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO jobs VALUES ('train', 'running', 7.0, ?)", (json.dumps(RUNNING),))
    conn.execute("INSERT INTO quarantine VALUES ('GPU-a', 'bad', 'op', 1.0)")
    conn.commit()
    conn.close()
    s = open_store(path, records)
    try:
        assert s.jobs() == [RUNNING] and list(s.excluded()) == ["GPU-a"] and rebuilt(s) == []
        assert RecordFiles(records).jobs()["train"].record == RUNNING
    finally:
        s.close()


# --- a lost database -----------------------------------------------------


def test_a_corrupt_header_is_rebuilt_from_the_files_with_a_critical_event(path: Path, records: Path) -> None:
    s = open_store(path, records)
    s.put_job("train", RUNNING)
    s.put_job("eval", BACKOFF)
    s.exclude("GPU-b", "Xid 79", by="uid 0", ts=5.0)
    s.close()
    with open(path, "r+b") as f:
        f.write(b"\0" * 100)
    s = open_store(path, records)
    try:
        assert s.jobs() == [BACKOFF, RUNNING]  # by name
        assert s.excluded() == {"GPU-b": QuarantineEntry("GPU-b", "Xid 79", "uid 0", 5.0)}
        [event] = rebuilt(s)
        assert event["severity"] == "critical" and "corrupt" in event["message"]
        assert event["jobs"] == ["eval", "train"] and event["gpus"] == ["GPU-b"]
        assert "2 job(s)" in event["message"] and "1 excluded GPU(s)" in event["message"]
        assert event["moved_to"] and Path(event["moved_to"]).exists()
    finally:
        s.close()
    s = open_store(path, records)  # the rebuilt database is whole again: nothing more to say
    try:
        assert rebuilt(s) == [event] and db_row(path, "train") == RUNNING
    finally:
        s.close()


def test_a_missing_database_is_rebuilt_from_the_files(path: Path, records: Path) -> None:
    s = open_store(path, records)
    s.put_job("train", RUNNING)
    s.close()
    path.unlink()
    s = open_store(path, records)
    try:
        assert s.get_job("train") == RUNNING and s.excluded() == {}
        [event] = rebuilt(s)
        assert "missing" in event["message"] and event["jobs"] == ["train"] and event["moved_to"] is None
    finally:
        s.close()


def test_an_include_survives_a_lost_database(path: Path, records: Path) -> None:
    s = open_store(path, records)
    s.exclude("GPU-a", "bad", by="op", ts=1.0)
    assert s.include("GPU-a") is True
    s.close()
    path.unlink()
    s = open_store(path, records)
    try:
        assert s.excluded() == {} and rebuilt(s)[0]["gpus"] == []
    finally:
        s.close()


# --- a full disk ---------------------------------------------------------


def test_a_full_disk_keeps_the_record_in_its_file_and_a_new_store_finds_it(path: Path, records: Path) -> None:
    s = open_store(path, records)
    s.put_job("train", RUNNING)
    fill_disk(s)
    with capture_logs() as logs:
        s.put_job("train", BACKOFF)  # no raise: the file took it
        s.put_job("new", RUNNING)
        s.exclude("GPU-a", "Xid 48", by="gpuguard", ts=2.0)
    assert any(e["event"] == "store_one_copy_failed" and "full" in e["error"] for e in logs)
    assert s.get_job("train") == BACKOFF and [j["state"] for j in s.jobs()] == ["running", "backoff"]
    assert list(s.excluded()) == ["GPU-a"]
    s.close()
    assert db_row(path, "train") == RUNNING and db_row(path, "new") is None  # the database missed them
    s = open_store(path, records)
    try:
        assert s.get_job("train") == BACKOFF and s.get_job("new") == RUNNING
        assert list(s.excluded()) == ["GPU-a"]
        assert rebuilt(s) == []  # the database was fine, only behind
    finally:
        s.close()
    assert db_row(path, "train") == BACKOFF and db_row(path, "new") == RUNNING  # repaired at open


def test_the_database_wins_when_its_row_is_newer_than_the_file(
    path: Path, records: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = open_store(path, records)
    s.put_job("train", RUNNING)
    s.exclude("GPU-a", "bad", by="op", ts=1.0)

    def no_space(*_: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RecordFiles, "write_job", no_space)
    monkeypatch.setattr(RecordFiles, "write_quarantine", no_space)
    s.put_job("train", BACKOFF)
    assert s.include("GPU-a") is True
    s.close()
    monkeypatch.undo()
    assert json.loads((records / "jobs" / "train.json").read_text())["record"] == RUNNING  # the file is behind
    s = open_store(path, records)
    try:
        assert s.get_job("train") == BACKOFF and s.excluded() == {}
    finally:
        s.close()
    assert json.loads((records / "jobs" / "train.json").read_text())["record"] == BACKOFF  # repaired at open


def test_a_save_that_no_copy_took_raises(store: EventStore, records: Path) -> None:
    store.put_job("train", RUNNING)
    for d in (records, records / "jobs"):
        d.chmod(0o777)  # refused: others could plant records
    fill_disk(store)
    with pytest.raises(StoreError, match="full") as raised:
        store.put_job("train", BACKOFF)
    assert "writable by no one else" in str(raised.value)
    with pytest.raises(StoreError):
        store.exclude("GPU-a", "bad", by="op")
    for d in (records, records / "jobs"):
        d.chmod(0o700)
    assert store.get_job("train") == RUNNING


# --- what the files are trusted with -------------------------------------


def test_files_that_are_not_this_users_own_are_ignored(store: EventStore, records: Path, tmp_path: Path) -> None:
    store.put_job("train", RUNNING)
    planted = tmp_path / "elsewhere.json"
    planted.write_text(json.dumps({"name": "evil", "saved_at": 9e9, "record": {"state": "running"}}))
    (records / "jobs" / "evil.json").symlink_to(planted)
    (records / "jobs" / "loose.json").write_text(planted.read_text().replace("evil", "loose"))
    (records / "jobs" / "loose.json").chmod(0o666)
    with capture_logs() as logs:
        assert [j["state"] for j in store.jobs()] == ["running"]
    assert sum(e["event"] == "store_record_unreadable" for e in logs) == 2


def test_a_file_for_another_name_or_without_a_state_is_ignored(store: EventStore, records: Path) -> None:
    store.put_job("train", RUNNING)
    body = (records / "jobs" / "train.json").read_text()
    (records / "jobs" / "copy.json").write_text(body)  # says "train" inside
    (records / "jobs" / "copy.json").chmod(0o600)
    with capture_logs():
        assert store.get_job("copy") is None and len(store.jobs()) == 1


def test_delete_removes_both_copies(path: Path, records: Path) -> None:
    s = open_store(path, records)
    s.put_job("train", RUNNING)
    assert s.delete_job("train") is True and s.delete_job("train") is False
    assert not (records / "jobs" / "train.json").exists()
    s.close()
    s = open_store(path, records)
    try:
        assert s.jobs() == []
    finally:
        s.close()
