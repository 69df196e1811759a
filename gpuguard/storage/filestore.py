"""A store on a shared filesystem (NFS, Lustre): `file:///path`.

Each write goes to a temporary name in the job's directory, is fsynced, renamed
into place and the directory fsynced, so a reader on another node sees a whole
file or none (rename is atomic on one directory, also over NFS). The sidecar
(sha256, size, creation time) follows the snapshot, and only ids with both are
listed; a delete removes the sidecar first. A temporary file left by a killed
writer is removed by a later put once it is an hour old (another node may be
writing one now).
"""

from __future__ import annotations

import errno
import json
import os
import time
import uuid
from pathlib import Path

from gpuguard.durable import fsync_dir, write_all, write_synced
from gpuguard.storage.objects import SIDECAR, SNAPSHOT_NAME, SUFFIX, StorageMisconfigured, newest_first
from gpuguard.storage.url import StorageUrl
from gpuguard.supervisor.ports import StoredSnapshot, StorageUnavailable

CHUNK = 4 * 1024 * 1024
_TMP = ".tmp-"
_STALE_TMP_S = 3600.0


class FileStore:
    def __init__(self, url: StorageUrl) -> None:
        self.url = url
        self.root = Path(url.path)

    def check(self) -> None:
        """The directory exists and this process may create files in it."""
        try:
            st = self.root.stat()
        except FileNotFoundError:
            raise StorageMisconfigured(f"[storage] url {self.url}: no such directory") from None
        except OSError as exc:
            raise self._failed("cannot reach the directory", exc) from None
        if not self.root.is_dir():
            raise StorageMisconfigured(f"[storage] url {self.url}: not a directory (mode {st.st_mode:o})")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageMisconfigured(f"[storage] url {self.url}: this daemon (uid {os.geteuid()}) may not write there")

    def put(self, job: str, snapshot_id: str, path: Path, sha256: str, created: float) -> None:
        jobdir = self.root / job
        tmp = jobdir / f"{_TMP}{uuid.uuid4().hex}{SUFFIX}"
        side_tmp = tmp.with_suffix(SIDECAR)
        try:
            jobdir.mkdir(mode=0o750, exist_ok=True)
            self._clean_stale(jobdir)
            with path.open("rb") as src:
                size = _copy_synced(src.fileno(), tmp)
            os.replace(tmp, jobdir / f"{snapshot_id}{SUFFIX}")
            meta = {"sha256": sha256, "size": size, "created": created}
            write_synced(side_tmp, json.dumps(meta).encode(), 0o640)
            os.replace(side_tmp, jobdir / f"{snapshot_id}{SIDECAR}")
            fsync_dir(jobdir)
        except OSError as exc:
            raise self._failed(f"cannot store {snapshot_id}", exc) from None
        finally:
            tmp.unlink(missing_ok=True)
            side_tmp.unlink(missing_ok=True)

    def list(self, job: str) -> list[StoredSnapshot]:
        jobdir = self.root / job
        found: list[StoredSnapshot] = []
        try:
            sidecars = list(jobdir.glob(f"*{SIDECAR}"))
        except OSError as exc:
            raise self._failed("cannot list", exc) from None
        for sidecar in sidecars:
            snap_id = sidecar.name[: -len(SIDECAR)]
            if not SNAPSHOT_NAME.match(snap_id) or not (jobdir / f"{snap_id}{SUFFIX}").exists():
                continue
            try:
                meta = json.loads(sidecar.read_bytes())
                found.append(
                    StoredSnapshot(job, snap_id, int(meta["size"]), str(meta["sha256"]), float(meta["created"]), self.url.where(job, f"{snap_id}{SUFFIX}"))
                )
            except FileNotFoundError:
                continue  # deleted meanwhile
            except (OSError, ValueError, KeyError, TypeError):
                continue  # an unreadable sidecar: that snapshot is not offered
        return newest_first(found)

    def get(self, snapshot: StoredSnapshot, dest: Path) -> None:
        src = self.root / snapshot.job / f"{snapshot.id}{SUFFIX}"
        try:
            with src.open("rb") as f:
                _copy_synced(f.fileno(), dest)
        except OSError as exc:
            dest.unlink(missing_ok=True)
            raise self._failed(f"cannot read {snapshot.id}", exc) from None

    def delete(self, job: str, snapshot_id: str) -> None:
        jobdir = self.root / job
        try:
            (jobdir / f"{snapshot_id}{SIDECAR}").unlink(missing_ok=True)
            (jobdir / f"{snapshot_id}{SUFFIX}").unlink(missing_ok=True)
            fsync_dir(jobdir)
        except OSError as exc:
            raise self._failed(f"cannot delete {snapshot_id}", exc) from None

    def _clean_stale(self, jobdir: Path) -> None:
        now = time.time()
        for entry in jobdir.glob(f"{_TMP}*"):
            try:
                if now - entry.stat().st_mtime > _STALE_TMP_S:
                    entry.unlink()
            except OSError:
                continue

    def _failed(self, what: str, exc: OSError) -> StorageUnavailable:
        """At run time every failure is an outage to retry (a server away, a full or
        read-only mount, permissions changed): the uploader says so and tries again."""
        hint = " (permissions or a read-only mount?)" if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else ""
        return StorageUnavailable(f"[storage] url {self.url}: {what}: {exc.strerror or exc}{hint}")


def _copy_synced(src_fd: int, dest: Path) -> int:
    """Copy to a new file `dest`, fsynced before this returns; the bytes copied."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    total = 0
    try:
        while chunk := os.read(src_fd, CHUNK):
            write_all(fd, chunk)
            total += len(chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    return total
