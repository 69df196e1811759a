"""Job records and the quarantine list, kept twice: rows in the database and
files under the records dir (`records`), so neither a full disk nor a lost
database loses them.

Every save takes a new stamp (`saved_at`: the wall clock, but never behind
the last stamp, even across restarts) and writes it with both copies. A read
takes, per job and for the quarantine list, the copy with the newer stamp; a
missing copy always loses. So a save whose database write failed (a full
disk) after its file was written is still found, and the other way round.
A save raises StoreError only when no copy took it. The quarantine list is
always written whole, in both copies, so the newer copy is complete.

At open, the copy that lost is rewritten from the one that won (best
effort), which also writes the files of a database that had none yet.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from gpuguard.contract import valid_job_name
from gpuguard.store.records import QuarantineEntry, RecordFiles, SavedJob, SavedQuarantine
from gpuguard.store.schema import StoreError

log = structlog.get_logger(__name__)

Write = Callable[[str, Callable[[sqlite3.Connection], Any]], Any]
Read = Callable[[str, Iterable[Any]], list[tuple[Any, ...]]]
T = TypeVar("T", SavedJob, SavedQuarantine)

_QUARANTINE = "quarantine"  # its row in the `saved` table


@dataclass(frozen=True, slots=True)
class Loaded:
    """What the store holds after open: jobs and excluded GPUs, and whether
    any records file was there to take them from."""

    jobs: list[str]
    gpus: list[str]
    had_files: bool


def _json(value: Mapping[str, Any]) -> str:
    return json.dumps(dict(value), default=str, separators=(",", ":"))


def _newer(db: T | None, file: T | None) -> T | None:
    """The copy with the newer stamp; the database's on a tie."""
    if file is not None and (db is None or file.saved_at > db.saved_at):
        return file
    return db


class DurableState:
    """Jobs and quarantine over the store's connection (`write`, `read`) and,
    when given, the records files. Its lock is taken before the connection's."""

    def __init__(self, write: Write, read: Read, files: RecordFiles | None) -> None:
        self._write = write
        self._read = read
        self.files = files
        self._lock = threading.RLock()  # orders stamps; file I/O never holds the connection's lock
        self._saved_at = 0.0

    # --- open ----------------------------------------------------------
    def load(self) -> Loaded:
        """Set the stamp past every stored one and rewrite the copies that lost."""
        with self._lock:
            db_jobs, file_jobs = self._db_jobs(), self.files.jobs() if self.files else {}
            db_q, file_q = self._db_quarantine(), self.files.quarantine() if self.files else None
            stamps = [j.saved_at for j in (*db_jobs.values(), *file_jobs.values())]
            self._saved_at = max([db_q.saved_at, file_q.saved_at if file_q else 0.0, *stamps])
            if self.files is not None:
                self.files.clean()
                for name in sorted(db_jobs.keys() | file_jobs.keys()):
                    self._repair_job(name, db_jobs.get(name), file_jobs.get(name))
                self._repair_quarantine(db_q, file_q)
            jobs = sorted(name for name in db_jobs.keys() | file_jobs.keys())
            gpus = sorted((_newer(db_q, file_q) or db_q).entries)
            return Loaded(jobs, gpus, had_files=bool(file_jobs) or file_q is not None)

    def _repair_job(self, name: str, db: SavedJob | None, file: SavedJob | None) -> None:
        assert self.files is not None
        try:
            if file is not None and (db is None or file.saved_at > db.saved_at):
                if db is not None:
                    log.warning("store_record_newer_than_database", job=name)
                self._write_job_row(name, file.record, file.saved_at)
            elif db is not None and (file is None or db.saved_at > file.saved_at):
                self.files.write_job(name, db.record, db.saved_at)
        except (OSError, StoreError) as exc:
            log.error("store_repair_failed", job=name, error=str(exc))

    def _repair_quarantine(self, db: SavedQuarantine, file: SavedQuarantine | None) -> None:
        assert self.files is not None
        try:
            if file is not None and file.saved_at > db.saved_at:
                log.warning("store_quarantine_file_newer_than_database", gpus=len(file.entries))
                self._write_quarantine_rows(file.entries, file.saved_at)
            elif file is None or db.saved_at > file.saved_at:
                self.files.write_quarantine(db.entries, db.saved_at)
        except (OSError, StoreError) as exc:
            log.error("store_repair_failed", what="quarantine", error=str(exc))

    # --- saving --------------------------------------------------------
    def _stamp(self) -> float:
        self._saved_at = max(time.time(), math.nextafter(self._saved_at, math.inf))
        return self._saved_at

    def _save(self, what: str, to_file: Callable[[RecordFiles, float], None], to_db: Callable[[float], None]) -> None:
        """Write both copies with one new stamp; StoreError when none took it."""
        saved_at = self._stamp()
        failures: list[str] = []
        if self.files is not None:
            try:
                to_file(self.files, saved_at)
            except OSError as exc:
                failures.append(f"{self.files.root}: {exc}")
        try:
            to_db(saved_at)
        except StoreError as exc:
            failures.append(str(exc))
        copies = 1 if self.files is None else 2
        if len(failures) == copies:
            raise StoreError(f"cannot {what}: " + "; ".join(failures))
        if failures:
            log.error("store_one_copy_failed", what=what, error=failures[0])

    def _write_job_row(self, name: str, record: Mapping[str, Any], saved_at: float) -> None:
        row = (name, str(record["state"]), saved_at, _json(record))
        self._write(
            "save a job",
            lambda c: c.execute("INSERT OR REPLACE INTO jobs (name, state, updated, record) VALUES (?, ?, ?, ?)", row),
        )

    def _write_quarantine_rows(self, entries: Mapping[str, QuarantineEntry], saved_at: float) -> None:
        rows = [(e.uuid, e.reason, e.by, e.ts) for e in entries.values()]

        def body(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM quarantine")
            c.executemany("INSERT INTO quarantine (uuid, reason, by, ts) VALUES (?, ?, ?, ?)", rows)
            c.execute("INSERT OR REPLACE INTO saved (what, saved_at) VALUES (?, ?)", (_QUARANTINE, saved_at))

        self._write("save the quarantine list", body)

    def _save_quarantine(self, entries: dict[str, QuarantineEntry], what: str) -> None:
        self._save(
            what,
            lambda files, stamp: files.write_quarantine(entries, stamp),
            lambda stamp: self._write_quarantine_rows(entries, stamp),
        )

    # --- jobs ----------------------------------------------------------
    def put_job(self, name: str, record: Mapping[str, Any]) -> None:
        """Save a job's record (valid name, with a "state") in both copies."""
        if not valid_job_name(name):
            raise ValueError(f"not a valid job name: {name!r}")
        if "state" not in record:
            raise ValueError(f"job record for {name!r} has no 'state'")
        with self._lock:
            self._save(
                f"save job {name}",
                lambda files, stamp: files.write_job(name, record, stamp),
                lambda stamp: self._write_job_row(name, record, stamp),
            )

    def get_job(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            rows = self._read("SELECT updated, record FROM jobs WHERE name = ?", (name,))
            db = SavedJob(json.loads(rows[0][1]), rows[0][0]) if rows else None
            found = _newer(db, self.files.job(name) if self.files else None)
        return found.record if found else None

    def jobs(self) -> list[dict[str, Any]]:
        """Every job record, by name."""
        with self._lock:
            db, files = self._db_jobs(), self.files.jobs() if self.files else {}
            found = {name: _newer(db.get(name), files.get(name)) for name in db.keys() | files.keys()}
        return [saved.record for _, saved in sorted(found.items()) if saved is not None]

    def delete_job(self, name: str) -> bool:
        """Forget a job in both copies; False if there was no record."""
        with self._lock:
            if self.get_job(name) is None:
                return False
            try:
                if self.files is not None and valid_job_name(name):
                    self.files.delete_job(name)  # first: a file left behind would bring the job back
            except OSError as exc:
                raise StoreError(f"cannot delete job {name}: {exc}") from exc
            self._write("delete a job", lambda c: c.execute("DELETE FROM jobs WHERE name = ?", (name,)))
            return True

    def _db_jobs(self) -> dict[str, SavedJob]:
        rows = self._read("SELECT name, updated, record FROM jobs", ())
        return {name: SavedJob(json.loads(record), updated) for name, updated, record in rows}

    # --- quarantine ----------------------------------------------------
    def exclude(self, entry: QuarantineEntry) -> None:
        """Quarantine a GPU (again: the new entry replaces the old)."""
        with self._lock:
            self._save_quarantine({**self.excluded(), entry.uuid: entry}, "exclude a GPU")

    def include(self, uuid: str) -> bool:
        """Return a GPU to service; False if it was not excluded."""
        with self._lock:
            current = self.excluded()
            if uuid not in current:
                return False
            self._save_quarantine({k: v for k, v in current.items() if k != uuid}, "include a GPU")
            return True

    def excluded(self) -> dict[str, QuarantineEntry]:
        """The excluded GPUs, ordered by when and uuid."""
        with self._lock:
            db = self._db_quarantine()
            found = _newer(db, self.files.quarantine() if self.files else None) or db
        return dict(sorted(found.entries.items(), key=lambda kv: (kv[1].ts, kv[0])))

    def _db_quarantine(self) -> SavedQuarantine:
        rows = self._read("SELECT uuid, reason, by, ts FROM quarantine", ())
        stamp = self._read("SELECT saved_at FROM saved WHERE what = ?", (_QUARANTINE,))
        return SavedQuarantine({r[0]: QuarantineEntry(*r) for r in rows}, stamp[0][0] if stamp else 0.0)
