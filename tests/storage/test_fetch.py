"""A job's first start: the newest stored snapshot newer than any local one is fetched on a
worker, checked (sha256, zip) and added to the ring; a broken one is refused and the next
older one used; a store that does not answer in time delays the start only so long."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpuguard.events import Event, EventKind
from gpuguard.health.types import Severity
from gpuguard.storage.uploader import Uploader
from gpuguard.supervisor.job import Job
from gpuguard.supervisor.jobspec import JobSpec
from gpuguard.supervisor import remote
from gpuguard.supervisor.remote import StoredFetch, listing
from gpuguard.supervisor.snapshots import SnapshotRing
from harness import wait_until
from tests.storage.fakes import Events, FlakyStore, snap_id, snapshot_file


class Rig:
    def __init__(self, tmp: Path) -> None:
        (tmp / "shared").mkdir()
        self.tmp = tmp
        self.store = FlakyStore(tmp / "shared")
        self.events = Events()
        self.uploader = Uploader(self.store, self.events, keep_newest=3, fetch_timeout_s=30.0)
        self.ring = SnapshotRing(tmp / "snapshots", keep_newest=3, max_bytes=10**9)
        self.woken = threading.Event()
        self.fetch = StoredFetch(self.ring, self.uploader, tmp / "fetch", self.say, self.woken.set)
        self.job = Job(JobSpec(name="yolo", command=("true",), workdir=tmp))

    def say(self, job: Job, kind: str, severity: Severity, message: str, *, data: dict[str, Any] | None = None) -> None:
        self.events(Event(kind=kind, severity=severity, message=message, job=job.name, data=data or {}))

    def stored(self, n: int) -> str:
        path, sha = snapshot_file(self.tmp / "elsewhere" / f"{n}.pt", n)
        self.store.put("yolo", snap_id(n), path, sha, 1000.0 + n)
        return snap_id(n)

    def start(self, *, woken: bool = True) -> None:
        """What try_start sees: not yet, then (after the worker woke the loop) go. When the
        start's own deadline ends the wait, the next tick goes: nobody need wake it."""
        assert not self.fetch.ready(self.job)
        wait_until(lambda: self.fetch.ready(self.job), 10.0, "the fetch to end")
        if woken:
            assert self.woken.is_set()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.store.open.set()


def resumes_from(rig: Rig) -> dict[str, Any]:
    snap = rig.ring.newest_valid("yolo")
    assert snap is not None
    return dict(snap.meta)


def test_the_newest_stored_snapshot_is_fetched_into_the_ring(rig: Rig) -> None:
    rig.stored(1)
    newest = rig.stored(2)
    rig.start()
    assert resumes_from(rig)["stored_id"] == newest
    (fetched,) = rig.events.of(EventKind.SNAPSHOT_FETCHED)
    assert fetched.data["stored_id"] == newest
    assert list((rig.tmp / "fetch").iterdir()) == []  # the download is gone once it is in the ring


@pytest.mark.parametrize("damage", ["a changed byte", "another checkpoint"])
def test_a_corrupted_stored_snapshot_is_refused_and_the_next_older_used(rig: Rig, damage: str) -> None:
    older = rig.stored(1)
    newest = rig.stored(2)
    obj = rig.tmp / "shared" / "yolo" / f"{newest}.pt"
    if damage == "a changed byte":  # the zip's CRC catches it
        data = bytearray(obj.read_bytes())
        data[len(data) // 2] ^= 0xFF
        obj.write_bytes(bytes(data))
    else:  # a whole valid checkpoint, only not the one stored: only the sha256 can tell
        snapshot_file(obj, 3)
    rig.start()
    (refused,) = rig.events.of(EventKind.STORED_SNAPSHOT_CORRUPT)
    assert refused.data["snapshot"] == newest
    assert ("sha256" if damage == "another checkpoint" else "CRC") in refused.message
    assert resumes_from(rig)["stored_id"] == older


def test_nothing_is_fetched_when_a_local_snapshot_is_newer(rig: Rig) -> None:
    rig.stored(1)  # created long ago by the store's clock
    local, _ = snapshot_file(rig.tmp / "work" / "ck.pt", 7)
    assert rig.ring.add("yolo", local).saved
    rig.start()
    assert rig.events.kinds() == []
    assert "stored_id" not in resumes_from(rig)


def test_a_store_that_does_not_answer_delays_the_start_at_most_the_timeout(rig: Rig) -> None:
    rig.stored(1)
    rig.store.open.clear()  # every call hangs
    rig.uploader.fetch_timeout_s = 0.3
    rig.start(woken=False)  # the listing's deadline may wake the loop, or the start's pass first
    (failed,) = rig.events.of(EventKind.SNAPSHOT_FETCH_FAILED)
    assert "0.3s" in failed.message  # the listing's deadline or the start's, whichever came first
    rig.store.open.set()
    assert rig.ring.list("yolo") == []


def test_a_store_that_is_down_starts_the_job_without(rig: Rig) -> None:
    rig.store.down.set()
    rig.start()
    assert rig.events.kinds() == [EventKind.SNAPSHOT_FETCH_FAILED]


def test_only_the_first_start_looks_in_the_store(rig: Rig) -> None:
    rig.stored(1)
    calls = rig.store.calls
    rig.job.attempt.number = 1
    assert rig.fetch.ready(rig.job)
    assert rig.store.calls == calls


def test_the_listing_says_where_each_is_kept(rig: Rig) -> None:
    only_stored = rig.stored(1)
    local, _ = snapshot_file(rig.tmp / "work" / "ck.pt", 7)
    snap = rig.ring.add("yolo", local).snapshot
    assert snap is not None
    rig.uploader.start()
    try:
        rig.uploader.offer("yolo", snap.id, snap.path, snap.sha256, snap.created)
        assert rig.uploader.wait_stored("yolo", snap.id, 10.0)
        local2, _ = snapshot_file(rig.tmp / "work" / "ck.pt", 8)
        snap2 = rig.ring.add("yolo", local2).snapshot
        assert snap2 is not None
        shown = listing([s.to_json() for s in rig.ring.list("yolo")], rig.uploader, "yolo")
    finally:
        rig.uploader.close()
    assert [(s["id"], s["where"]) for s in shown] == [(snap2.id, "local"), (snap.id, "both"), (only_stored, "stored")]
    assert shown[2]["url"] == f"{rig.store.url}/yolo/{only_stored}.pt" and shown[2]["path"] is None
    assert {"id", "path", "size", "created", "sha256", "source", "meta", "valid"} <= set(shown[0])


def test_the_listing_does_not_wait_for_a_silent_store(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "LIST_TIMEOUT_S", 0.2)
    local, _ = snapshot_file(rig.tmp / "work" / "ck.pt", 7)
    assert rig.ring.add("yolo", local).saved
    rig.store.open.clear()  # every call hangs
    shown = listing([s.to_json() for s in rig.ring.list("yolo")], rig.uploader, "yolo")
    assert [s["where"] for s in shown] == ["local"]
