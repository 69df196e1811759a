"""The narrow protocol every store implements (`file`, `s3`), and what they share.

A stored snapshot is `PREFIX/JOB/SNAPSHOT-ID.pt` with its sha256 and creation
time beside it: S3 keeps them as the object's user metadata (`sha256`,
`created`), written in the same PUT, so an object never exists without them;
the file store writes a `SNAPSHOT-ID.json` sidecar after the `.pt` is in place,
and lists only ids that have both.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

from gpuguard.storage.url import StorageUrl
from gpuguard.supervisor.ports import StoredSnapshot

SUFFIX = ".pt"
SIDECAR = ".json"
# the ring's ids (20261130T113807Z-000001-1a2b3c4d); anything else in the store is not ours
SNAPSHOT_NAME = re.compile(r"^\d{8}T\d{6}Z-\d{6,}-[0-9a-f]{8}$")

class StorageMisconfigured(Exception):
    """The store can never work as configured (no such bucket or directory, access
    denied, no credentials): the daemon refuses to start. The message names the url."""


class ObjectStore(Protocol):
    """Blocking calls, made only on the uploader's thread or a worker with a deadline."""

    url: StorageUrl

    def check(self) -> None:
        """One cheap call: StorageMisconfigured for a lasting mistake, ports.StorageUnavailable
        for an outage (as every other call raises on a failure)."""

    def put(self, job: str, snapshot_id: str, path: Path, sha256: str, created: float) -> None:
        """Store the file whole, or not at all (a reader never sees a partial object)."""

    def list(self, job: str) -> list[StoredSnapshot]:
        """The job's complete stored snapshots, newest first."""

    def get(self, snapshot: StoredSnapshot, dest: Path) -> None:
        """Write the snapshot's bytes to `dest` (the caller checks them)."""

    def delete(self, job: str, snapshot_id: str) -> None:
        """Remove the snapshot; no error when it is gone already."""


def newest_first(snaps: list[StoredSnapshot]) -> list[StoredSnapshot]:
    """By creation time, then id (ids begin with a UTC stamp, so they sort by time too)."""
    return sorted(snaps, key=lambda s: (s.created, s.id), reverse=True)
