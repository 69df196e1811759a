"""The database file itself: tables, migrations, opening, and salvage.

Kept apart from the reads and writes (`event_store`) because it is the part
that changes with the schema and the part that must never lose quarantine:
everything here runs once, when the store opens. A corrupt file is moved
aside and a fresh one started (a daemon that refuses to start leaves the node
unwatched), with quarantine and job rows copied over where they still read.
A database from a newer gpuguard is not corrupt: StoreError, nothing touched.
`open_database` also says whether the file was new (or empty) and where a
corrupt one went, so the store can tell a lost database from a first start.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 5000
JOURNAL_SIZE_LIMIT = 16 * 1024 * 1024  # the WAL is truncated to this after a checkpoint


class StoreError(Exception):
    """The store cannot do what was asked; the message names the database file."""


class _Corrupt(Exception):
    """The database file does not read as SQLite, or fails its quick check."""


def _schema_v1(conn: sqlite3.Connection) -> None:
    conn.execute(
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            ts REAL NOT NULL,
            kind TEXT NOT NULL,
            severity TEXT NOT NULL,
            gpu TEXT,
            job TEXT,
            xid INTEGER,
            message TEXT NOT NULL,
            data TEXT NOT NULL DEFAULT '{}'
        )"""
    )
    conn.execute("CREATE INDEX events_gpu ON events (gpu, id)")
    conn.execute("CREATE INDEX events_job ON events (job, id)")
    conn.execute("CREATE INDEX events_ts ON events (ts)")
    conn.execute("CREATE INDEX events_kind ON events (kind, id)")
    conn.execute(
        """CREATE TABLE quarantine (
            uuid TEXT PRIMARY KEY,
            reason TEXT NOT NULL,
            by TEXT NOT NULL,
            ts REAL NOT NULL
        )"""
    )
    conn.execute(
        """CREATE TABLE jobs (
            name TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            updated REAL NOT NULL,
            record TEXT NOT NULL
        )"""
    )


def _schema_v2(conn: sqlite3.Connection) -> None:
    # when a set of rows (the quarantine list) was last saved: the store's
    # stamp, also in the records files, so the newer copy can be told
    conn.execute("CREATE TABLE saved (what TEXT PRIMARY KEY, saved_at REAL NOT NULL)")


# _MIGRATIONS[n] takes a database from user_version n to n + 1
_MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_schema_v1, _schema_v2)
assert len(_MIGRATIONS) == SCHEMA_VERSION


@dataclass(frozen=True, slots=True)
class Opened:
    """An open database: `fresh` when it started empty (new, empty, or the
    replacement of a corrupt file), `moved_aside` where a corrupt one went."""

    conn: sqlite3.Connection
    fresh: bool
    moved_aside: Path | None


def migrate(conn: sqlite3.Connection, path: Path) -> int:
    """Bring the schema to SCHEMA_VERSION, one step per transaction; returns
    the version found."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: schema version {version} was written by a newer gpuguard (this one knows {SCHEMA_VERSION})"
        )
    for step in range(version, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            _MIGRATIONS[step](conn)
            conn.execute(f"PRAGMA user_version = {step + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return int(version)


def _is_corruption(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def open_database(path: Path) -> Opened:
    """The database at `path`, migrated to SCHEMA_VERSION; a corrupt file is
    moved aside and its quarantine and job rows salvaged into a fresh one.
    Raises StoreError when neither opens."""
    try:
        try:
            conn, found = _connect(path)
            return Opened(conn, fresh=found == 0, moved_aside=None)
        except _Corrupt as exc:
            aside = _move_aside(path, str(exc))
        conn, _ = _connect(path)
    except (OSError, sqlite3.Error, _Corrupt) as exc:
        raise StoreError(f"{path}: cannot open the event store: {exc}") from exc
    _salvage(aside, conn)
    return Opened(conn, fresh=True, moved_aside=aside)


def _connect(path: Path) -> tuple[sqlite3.Connection, int]:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        # SQLite gives the -wal and -shm files the database file's mode
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(path, 0o600)  # whatever the umask
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        check = [str(r[0]) for r in conn.execute("PRAGMA quick_check").fetchall()]
        if check != ["ok"]:
            raise _Corrupt("; ".join(check[:5]))
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            log.warning("store_not_wal", path=str(path), journal_mode=mode)
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        found = migrate(conn, path)
    except sqlite3.DatabaseError as exc:
        conn.close()
        if _is_corruption(exc):
            raise _Corrupt(str(exc)) from exc
        raise
    except BaseException:
        conn.close()
        raise
    return conn, found


def _move_aside(path: Path, why: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{path}{suffix}")
        if src.exists():
            src.rename(f"{aside}{suffix}")
    log.error("store_corrupt", path=str(path), moved_to=str(aside), error=why)
    return aside


def _salvage(aside: Path, conn: sqlite3.Connection) -> None:
    """Copy quarantine and job rows from the corrupt file, where it reads them."""
    for table, columns in (("quarantine", "uuid, reason, by, ts"), ("jobs", "name, state, updated, record")):
        marks = ", ".join("?" * len(columns.split(",")))
        try:
            old = sqlite3.connect(aside)
            try:
                rows = old.execute(f"SELECT {columns} FROM {table}").fetchall()
            finally:
                old.close()
            conn.executemany(f"INSERT OR REPLACE INTO {table} ({columns}) VALUES ({marks})", rows)
        except sqlite3.Error as exc:
            log.error("store_salvage_failed", path=str(aside), table=table, error=str(exc))
            continue
        log.warning("store_salvaged", path=str(aside), table=table, rows=len(rows))
