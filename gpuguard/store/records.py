"""The second copy of what must survive a lost database: one file per job
record and one for the quarantine list, beside the database.

Layout under the records dir (STATE_DIR/records, 0700):

- `jobs/<name>.json`: `{"name": ..., "saved_at": ..., "record": {...}}`
- `quarantine.json`: `{"saved_at": ..., "gpus": [{"uuid", "reason", "by", "ts"}, ...]}`

Each write goes to a temp name in the same dir (`.<name>.<random>.tmp`), is
fsynced, renamed over the old file, and the dir fsynced: a file is the old
version or the new one, never half of either. Files are 0600 and owned by
the daemon's user; anything else there (a symlink, another user's file, one
others may write) is refused when read: a job record names a command to run.
`saved_at` is the store's save stamp, written into the database row too, so
the newer copy can be told.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from gpuguard.contract import valid_job_name
from gpuguard.durable import write_all

log = structlog.get_logger(__name__)

MAX_FILE_BYTES = 8 * 1024 * 1024  # a record file larger than this is refused
QUARANTINE_FILE = "quarantine.json"
_SUFFIX = ".json"
_TMP_SUFFIX = ".tmp"


@dataclass(frozen=True, slots=True)
class QuarantineEntry:
    uuid: str
    reason: str
    by: str
    ts: float


@dataclass(frozen=True, slots=True)
class SavedJob:
    """One copy of a job's record and the stamp it was saved with."""

    record: dict[str, Any]
    saved_at: float


@dataclass(frozen=True, slots=True)
class SavedQuarantine:
    """One copy of the quarantine list and the stamp it was saved with."""

    entries: dict[str, QuarantineEntry]
    saved_at: float


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"not a number: {value!r}")
    return float(value)


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"not a string: {value!r}")
    return value


def _dumps(value: Mapping[str, Any]) -> bytes:
    # default=str as in the database: a Path in a record must not cost the record
    return json.dumps(dict(value), default=str, separators=(",", ":")).encode()


class RecordFiles:
    """Job records and the quarantine list as files under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.jobs_dir = self.root / "jobs"

    # --- writing -------------------------------------------------------
    def write_job(self, name: str, record: Mapping[str, Any], saved_at: float) -> None:
        """Replace the job's file atomically; raises OSError (ENOSPC, ...)."""
        data = _dumps({"name": name, "saved_at": saved_at, "record": dict(record)})
        self._replace(self.jobs_dir, self._job_file(name), data)

    def delete_job(self, name: str) -> None:
        """Remove the job's file (gone already is fine); raises OSError."""
        dfd = self._open_dir(self.jobs_dir, create=False)
        if dfd is None:
            return
        try:
            try:
                os.unlink(self._job_file(name), dir_fd=dfd)
            except FileNotFoundError:
                return
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def write_quarantine(self, entries: Mapping[str, QuarantineEntry], saved_at: float) -> None:
        """Replace the quarantine file atomically; raises OSError."""
        gpus = [{"uuid": e.uuid, "reason": e.reason, "by": e.by, "ts": e.ts} for e in entries.values()]
        self._replace(self.root, QUARANTINE_FILE, _dumps({"saved_at": saved_at, "gpus": gpus}))

    def clean(self) -> None:
        """Remove temp files a crash left behind (best effort)."""
        for path in (self.root, self.jobs_dir):
            dfd = self._open_dir(path, create=False)
            if dfd is None:
                continue
            try:
                for entry in os.listdir(dfd):
                    if entry.startswith(".") and entry.endswith(_TMP_SUFFIX):
                        os.unlink(entry, dir_fd=dfd)
            except OSError as exc:
                log.warning("store_records_clean_failed", path=str(path), error=str(exc))
            finally:
                os.close(dfd)

    # --- reading -------------------------------------------------------
    def job(self, name: str) -> SavedJob | None:
        """The job's file, if there is a readable one; None for an invalid name."""
        if not valid_job_name(name):
            return None
        return self._read_job(name)

    def jobs(self) -> dict[str, SavedJob]:
        """Every readable job file, by name; unreadable ones are logged and skipped."""
        dfd = self._open_dir(self.jobs_dir, create=False)
        if dfd is None:
            return {}
        try:
            entries = os.listdir(dfd)
        finally:
            os.close(dfd)
        found: dict[str, SavedJob] = {}
        for entry in sorted(entries):
            name = entry[: -len(_SUFFIX)]
            if not entry.endswith(_SUFFIX) or not valid_job_name(name):
                continue
            saved = self._read_job(name)
            if saved is not None:
                found[name] = saved
        return found

    def quarantine(self) -> SavedQuarantine | None:
        """The quarantine file, if there is a readable one."""
        path = self.root / QUARANTINE_FILE
        try:
            raw = self._load(self.root, QUARANTINE_FILE)
            if raw is None:
                return None
            entries = {}
            for gpu in raw["gpus"]:
                entry = QuarantineEntry(_text(gpu["uuid"]), _text(gpu["reason"]), _text(gpu["by"]), _number(gpu["ts"]))
                entries[entry.uuid] = entry
            return SavedQuarantine(entries, _number(raw["saved_at"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("store_record_unreadable", path=str(path), error=str(exc))
            return None

    def _read_job(self, name: str) -> SavedJob | None:
        path = self.jobs_dir / self._job_file(name)
        try:
            raw = self._load(self.jobs_dir, self._job_file(name))
            if raw is None:
                return None
            if raw["name"] != name or not isinstance(raw["record"], dict) or "state" not in raw["record"]:
                raise ValueError("not a job record of this name")
            return SavedJob(raw["record"], _number(raw["saved_at"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("store_record_unreadable", path=str(path), error=str(exc))
            return None

    # --- plumbing ------------------------------------------------------
    @staticmethod
    def _job_file(name: str) -> str:
        if not valid_job_name(name):  # before any path is built from it
            raise ValueError(f"not a valid job name: {name!r}")
        return name + _SUFFIX

    @staticmethod
    def _open_dir(path: Path, create: bool) -> int | None:
        """An fd of the dir (None when absent and not to be created). It must
        be this user's and writable by no one else: its files are trusted."""
        if create:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        st = os.fstat(dfd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            os.close(dfd)
            raise PermissionError(f"{path} must be owned by uid {os.geteuid()} and writable by no one else")
        return dfd

    def _replace(self, directory: Path, name: str, data: bytes) -> None:
        dfd = self._open_dir(directory, create=True)
        assert dfd is not None  # created above
        tmp = f".{name}.{secrets.token_hex(4)}{_TMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
            try:
                os.fchmod(fd, 0o600)  # whatever the umask
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            os.fsync(dfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
        finally:
            os.close(dfd)

    @staticmethod
    def _load(directory: Path, name: str) -> Any:
        """The file's JSON, None when there is no file; raises for anything untrusted."""
        dfd = RecordFiles._open_dir(directory, create=False)
        if dfd is None:
            return None
        try:
            # O_NONBLOCK: a FIFO planted here must not hang the daemon
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        except FileNotFoundError:
            return None
        finally:
            os.close(dfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
                raise ValueError(f"not a regular file of uid {os.geteuid()} that only it may write")
            if st.st_size > MAX_FILE_BYTES:
                raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
            data = bytearray()
            while (chunk := os.read(fd, 1 << 16)) and len(data) <= MAX_FILE_BYTES:
                data += chunk
        finally:
            os.close(fd)
        if len(data) > MAX_FILE_BYTES:
            raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
        return json.loads(data)
