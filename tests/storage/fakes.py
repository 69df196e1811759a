"""Fakes at the store's boundary for the storage unit tests (imported as
`from tests.storage.fakes import ...`): a real file store that can be taken down,
an event sink, and checkpoint bytes."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from checkpoint_files import checkpoint_bytes
from gpuguard.events import Event
from gpuguard.storage.filestore import FileStore
from gpuguard.storage.url import parse_url
from gpuguard.supervisor.ports import StoredSnapshot, StorageUnavailable


class Events:
    """The uploader's and the fetch's event sink."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[Event] = []

    def __call__(self, event: Event) -> Event:
        with self.lock:
            self.seen.append(event)
        return event

    def kinds(self) -> list[str]:
        with self.lock:
            return [e.kind for e in self.seen]

    def of(self, kind: str) -> list[Event]:
        with self.lock:
            return [e for e in self.seen if e.kind == kind]


class FlakyStore(FileStore):
    """A real file store that fails every call while `down` is set; a put while down
    first leaves half a temporary file, as a writer killed mid-copy would."""

    def __init__(self, root: Path) -> None:
        super().__init__(parse_url(f"file://{root}"))
        self.down = threading.Event()
        self.open = threading.Event()  # cleared: every call hangs (a silent server) until it is set again
        self.open.set()
        self.calls = 0
        self.puts = 0

    def _gate(self) -> None:
        self.open.wait()
        self.calls += 1
        if self.down.is_set():
            raise StorageUnavailable(f"[storage] url {self.url}: server away")

    def put(self, job: str, snapshot_id: str, path: Path, sha256: str, created: float) -> None:
        if self.down.is_set():
            (self.root / job).mkdir(exist_ok=True)
            (self.root / job / f".tmp-cut-{snapshot_id}.pt").write_bytes(path.read_bytes()[:100])
        self._gate()
        self.puts += 1
        super().put(job, snapshot_id, path, sha256, created)

    def list(self, job: str) -> list[StoredSnapshot]:
        self._gate()
        return super().list(job)

    def get(self, snapshot: StoredSnapshot, dest: Path) -> None:
        self._gate()
        super().get(snapshot, dest)


def snapshot_file(where: Path, n: int) -> tuple[Path, str]:
    """A checkpoint file as the ring would have it, and its sha256."""
    data = checkpoint_bytes(bytes([n]) * 4096, epoch=n)
    where.parent.mkdir(parents=True, exist_ok=True)
    where.write_bytes(data)
    return where, hashlib.sha256(data).hexdigest()


def snap_id(n: int) -> str:
    return f"20261130T1200{n:02d}Z-{n:06d}-{n:08x}"
