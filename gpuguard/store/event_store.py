"""EventStore: the reads and writes the daemon makes on an open database.

Kept apart from `schema` (tables, migrations, opening, salvage) because this
is the part that runs every tick: one connection behind a lock, each write one
short transaction. `append()` never raises for a failing disk (the event waits
in a bounded backlog); quarantine and job writes raise StoreError, since
their caller must know. Jobs and quarantine are delegated to `state`, which
also keeps them as files when the store is given a records dir; a database
lost or corrupt at open is then rebuilt from them, with a critical
`state_rebuilt` event.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog

from gpuguard.events import Event, EventKind
from gpuguard.health.types import Severity
from gpuguard.store.records import QuarantineEntry, RecordFiles
from gpuguard.store.schema import Opened, StoreError, open_database
from gpuguard.store.state import DurableState, Loaded

log = structlog.get_logger(__name__)

BACKLOG_MAX = 1000

_EVENT_COLUMNS = "id, ts, kind, severity, gpu, job, xid, message, data"


def _json(value: Mapping[str, Any]) -> str:
    # default=str: a Path or enum in the extras must not cost the whole event
    return json.dumps(dict(value), default=str, separators=(",", ":"))


def _event_from_row(row: tuple[Any, ...]) -> Event:
    id_, ts, kind, severity, gpu, job, xid, message, data = row
    return Event(
        kind=kind,
        severity=Severity(severity),
        message=message,
        gpu=gpu,
        job=job,
        xid=xid,
        data=json.loads(data),
        ts=ts,
        id=id_,
    )


def _matches(event: Event, gpu: str | None, job: str | None, kinds: Sequence[str] | None) -> bool:
    return (
        (gpu is None or event.gpu == gpu)
        and (job is None or event.job == job)
        and (kinds is None or event.kind in kinds)
    )


class EventStore:
    """The SQLite store; safe to share between threads. With `records` (a
    dir), job records and the quarantine list are also kept as files there."""

    def __init__(self, path: Path, records: Path | None = None) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._backlog: deque[Event] = deque(maxlen=BACKLOG_MAX)
        self._dropped = 0  # backlog overflow since the last good write
        self._failures: set[str] = set()  # failure kinds already logged
        opened = open_database(self.path)
        self._conn: sqlite3.Connection | None = opened.conn
        files = RecordFiles(records) if records is not None else None
        self._state = DurableState(self._guarded_write, self._read, files)
        try:
            loaded = self._state.load()
        except BaseException:
            self.close()
            raise
        if files is not None and (opened.moved_aside is not None or (opened.fresh and loaded.had_files)):
            self._rebuilt(opened, loaded, files)

    def _rebuilt(self, opened: Opened, loaded: Loaded, files: RecordFiles) -> None:
        """Say loudly that the database was lost and what came back from the files."""
        what = f"was corrupt (moved to {opened.moved_aside})" if opened.moved_aside else "was missing or empty"
        message = (
            f"event store {self.path} {what}: rebuilt {len(loaded.jobs)} job(s) and "
            f"{len(loaded.gpus)} excluded GPU(s) from {files.root}; events before this are not here"
        )
        data = {
            "moved_to": str(opened.moved_aside) if opened.moved_aside else None,
            "records": str(files.root),
            "jobs": loaded.jobs,
            "gpus": loaded.gpus,
        }
        log.critical("store_rebuilt", path=str(self.path), **data)
        self.append(Event(kind=EventKind.STATE_REBUILT, severity=Severity.CRITICAL, message=message, data=data))

    # --- plumbing ------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"{self.path}: the event store is closed")
        return self._conn

    @staticmethod
    def _write(conn: sqlite3.Connection, body: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run `body` in one short write transaction."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = body(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    def _guarded_write(self, what: str, body: Callable[[sqlite3.Connection], Any]) -> Any:
        """A write whose failure the caller must hear about, as StoreError."""
        with self._lock:
            try:
                return self._write(self._connection(), body)
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: cannot {what}: {exc}") from exc

    def _read(self, sql: str, params: Iterable[Any]) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._connection().execute(sql, tuple(params)).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: cannot read: {exc}") from exc

    # --- events --------------------------------------------------------
    def append(self, event: Event) -> Event:
        """Store `event`; returns it with its id. On a failing disk the event
        waits in the backlog (returned with id None) and this never raises."""
        with self._lock:
            conn = self._connection()
            pending = [*self._backlog, event]
            try:
                stored = self._write(conn, lambda c: [self._insert(c, e) for e in pending])
            except sqlite3.Error as exc:
                self._on_failure(exc, event)
                return event
            if self._failures or self._dropped:
                log.warning(
                    "store_writable_again", path=str(self.path), flushed=len(pending) - 1, dropped=self._dropped
                )
            self._backlog.clear()
            self._failures.clear()
            self._dropped = 0
            return stored[-1]

    @staticmethod
    def _insert(conn: sqlite3.Connection, e: Event) -> Event:
        cur = conn.execute(
            "INSERT INTO events (ts, kind, severity, gpu, job, xid, message, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (e.ts, e.kind, e.severity.value, e.gpu, e.job, e.xid, e.message, _json(e.data)),
        )
        return replace(e, id=cur.lastrowid)

    def _on_failure(self, exc: sqlite3.Error, event: Event) -> None:
        if len(self._backlog) == self._backlog.maxlen:
            self._dropped += 1
        self._backlog.append(event)
        why = str(exc)
        if why not in self._failures:
            self._failures.add(why)
            log.error("store_write_failed", path=str(self.path), error=why, backlog=len(self._backlog))

    @property
    def backlog(self) -> int:
        """Events waiting in memory for the disk to take them again."""
        with self._lock:
            return len(self._backlog)

    def events(
        self,
        limit: int | None = 100,
        gpu: str | None = None,
        job: str | None = None,
        kinds: Sequence[str] | None = None,
        since_id: int | None = None,
    ) -> list[Event]:
        """The last `limit` matching events, oldest first (newest last).
        Backlog events (not yet on disk, id None) count as the newest and
        match any `since_id`."""
        where: list[str] = []
        params: list[Any] = []
        for column, value in (("gpu", gpu), ("job", job)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if kinds is not None:
            kinds = [str(k) for k in kinds]
            where.append(f"kind IN ({', '.join('?' * len(kinds))})")
            params.extend(kinds)
        if since_id is not None:
            where.append("id > ?")
            params.append(since_id)
        sql = f"SELECT {_EVENT_COLUMNS} FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        with self._lock:
            rows = self._read(sql, params)
            waiting = [e for e in self._backlog if _matches(e, gpu, job, kinds)]
        found = [_event_from_row(r) for r in reversed(rows)] + waiting
        if limit is None:
            return found
        return found[-limit:] if limit > 0 else []

    def prune(self, max_age_s: float, max_rows: int, now: float | None = None) -> int:
        """Delete events older than `max_age_s`, then the oldest beyond
        `max_rows`; returns how many went. Cheap when there is nothing to do:
        two index lookups."""
        cutoff = (time.time() if now is None else now) - max_age_s

        def body(c: sqlite3.Connection) -> int:
            gone = c.execute("DELETE FROM events WHERE ts < ?", (cutoff,)).rowcount
            low, high = c.execute("SELECT (SELECT min(id) FROM events), (SELECT max(id) FROM events)").fetchone()
            # ids are unique, so a span within max_rows means no more rows than that
            if low is not None and high - low + 1 > max_rows:
                newest_to_go = c.execute(
                    "SELECT id FROM events ORDER BY id DESC LIMIT 1 OFFSET ?", (max(max_rows, 0),)
                ).fetchone()
                if newest_to_go is not None:
                    gone += c.execute("DELETE FROM events WHERE id <= ?", newest_to_go).rowcount
            return gone

        return int(self._guarded_write("prune events", body))

    def size_bytes(self) -> int:
        """The database file plus its write-ahead log, in bytes."""
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.stat(f"{self.path}{suffix}").st_size
            except FileNotFoundError:
                pass
        return total

    # --- quarantine and jobs (kept twice: see `state`) ---------------
    def exclude(self, uuid: str, reason: str, by: str, ts: float | None = None) -> None:
        """Quarantine a GPU (again: the new reason replaces the old)."""
        self._state.exclude(QuarantineEntry(uuid, reason, by, time.time() if ts is None else ts))

    def include(self, uuid: str) -> bool:
        """Return a GPU to service; False if it was not excluded."""
        return self._state.include(uuid)

    def excluded(self) -> dict[str, QuarantineEntry]:
        return self._state.excluded()

    def put_job(self, name: str, record: Mapping[str, Any]) -> None:
        """Insert or replace a job's record; it must hold a "state". Raises
        StoreError only when no copy could be written."""
        self._state.put_job(name, record)

    def get_job(self, name: str) -> dict[str, Any] | None:
        return self._state.get_job(name)

    def jobs(self) -> list[dict[str, Any]]:
        """Every job record, by name."""
        return self._state.jobs()

    def delete_job(self, name: str) -> bool:
        """Forget a job; False if there was no record."""
        return self._state.delete_job(name)

    # --- closing -------------------------------------------------------
    def close(self) -> None:
        """Write what the backlog still holds (once, best effort) and close."""
        with self._lock:
            if self._conn is None:
                return
            if self._backlog:
                try:
                    self._write(self._conn, lambda c: [self._insert(c, e) for e in self._backlog])
                except sqlite3.Error as exc:
                    log.error("store_backlog_lost", path=str(self.path), events=len(self._backlog), error=str(exc))
                self._backlog.clear()
            self._conn.close()
            self._conn = None
