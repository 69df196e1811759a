"""gpuguard's memory: events, GPU quarantine and job records in one SQLite
database (WAL mode) under the state dir, with quarantine and job records also
kept as files beside it.

Split by job so each part reads alone:

- `schema`: the database file itself: its tables, the migrations between
  schema versions, opening it with the right pragmas, and what happens when
  the file is corrupt (moved aside, rows that matter salvaged).
- `event_store`: `EventStore`, the reads and writes the daemon makes on an
  open database (events with their in-memory backlog, quarantine, jobs).
- `state`: jobs and quarantine kept twice, as rows and as files; the newer
  copy wins, and a lost database is rebuilt from the files.
- `records`: those files (STATE_DIR/records/jobs/<name>.json and
  STATE_DIR/records/quarantine.json), each written atomically.

Choices worth knowing:

- One connection behind a lock, shared by the daemon's threads. Every write
  is one short `BEGIN IMMEDIATE` transaction; `busy_timeout` covers another
  process (an operator's sqlite3 shell) holding the file.
- A corrupt database file is renamed aside to `<name>.corrupt-<UTC time>`
  (with its -wal/-shm), logged at error level naming both paths, and a fresh
  one is started: a health daemon that refuses to start leaves the node
  unwatched. Quarantine and job rows are copied from the old file where it
  still reads them, so a corrupt page does not silently return an excluded
  GPU to service. A database from a newer gpuguard is not corrupt: opening
  it raises StoreError and touches nothing.
- `append()` never raises for a failing disk (full, read-only, I/O error):
  the event waits in a bounded in-memory backlog, each kind of failure is
  logged once, and the next append writes the backlog first. Quarantine
  and job writes raise StoreError instead, when neither the row nor the
  file took them: their caller must know.
- A database lost or corrupt at open, with records files there, is rebuilt
  from them and a critical `state_rebuilt` event says how many jobs and
  excluded GPUs came back. Deleting the database alone does not reset
  gpuguard's state: the records dir must go too.
- Quarantine lives in its own table, so pruning events never un-excludes
  a GPU. Event ids are AUTOINCREMENT: never reused after a prune, so
  `since_id` polling stays correct.
"""

from __future__ import annotations

from gpuguard.store.event_store import BACKLOG_MAX, EventStore
from gpuguard.store.records import QuarantineEntry, RecordFiles
from gpuguard.store.schema import (
    BUSY_TIMEOUT_MS,
    JOURNAL_SIZE_LIMIT,
    SCHEMA_VERSION,
    Opened,
    StoreError,
    migrate,
    open_database,
)

__all__ = [
    "BACKLOG_MAX",
    "BUSY_TIMEOUT_MS",
    "JOURNAL_SIZE_LIMIT",
    "SCHEMA_VERSION",
    "EventStore",
    "Opened",
    "QuarantineEntry",
    "RecordFiles",
    "StoreError",
    "migrate",
    "open_database",
]
