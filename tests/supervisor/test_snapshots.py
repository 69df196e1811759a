"""The snapshot ring on real files under tmp_path; a fake clock stands in for time."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from checkpoint_files import checkpoint_bytes, make_checkpoint
from gpuguard.supervisor import snapshot_check, snapshot_files
from gpuguard.supervisor.retention import band, select_retained
from gpuguard.supervisor.snapshots import Snapshot, SnapshotCorrupt, SnapshotRing

HOUR = 3600.0
T0 = 1_800_000_000.0


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ring(tmp_path: Path, clock: Clock) -> SnapshotRing:
    return SnapshotRing(tmp_path / "snapshots", keep_newest=3, max_bytes=10**9, clock=clock)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path / "work"


def write_epoch(workdir: Path, epoch: int) -> Path:
    path = workdir / "runs" / "weights" / "last.pt"
    make_checkpoint(path, bytes([epoch % 256]) * 2048, epoch=epoch)
    return path


def job_files(ring: SnapshotRing, job: str = "yolo") -> list[str]:
    return sorted(p.name for p in (ring.root / job).iterdir())


def test_add_list_newest_get_before_newest(ring: SnapshotRing, workdir: Path, clock: Clock) -> None:
    first = ring.add("yolo", write_epoch(workdir, 1), job_workdir=workdir, meta={"epoch": 1, "attempt": 1})
    assert first.saved and first.snapshot is not None
    clock.now += 60
    second = ring.add("yolo", write_epoch(workdir, 2), job_workdir=workdir, meta={"epoch": 2, "attempt": 1})
    assert second.snapshot is not None

    listed = ring.list("yolo")
    assert [s.id for s in listed] == [second.snapshot.id, first.snapshot.id]
    assert ring.newest("yolo") == second.snapshot
    assert ring.before_newest("yolo") == first.snapshot
    assert ring.get("yolo", first.snapshot.id) == first.snapshot
    assert ring.get("yolo", "../../etc/passwd") is None

    snap = second.snapshot
    assert snap.path.read_bytes() == (workdir / "runs/weights/last.pt").read_bytes()
    assert snap.path.stat().st_mtime == (workdir / "runs/weights/last.pt").stat().st_mtime
    assert snap.meta == {"epoch": 2, "attempt": 1}
    assert snap.source == str(workdir / "runs/weights/last.pt")
    assert snap.id.startswith("20270115T080100Z-000002-") and snap.id.endswith(snap.sha256[:8])
    sidecar = json.loads(snap.path.with_suffix(".json").read_text())
    assert {"source", "size", "sha256", "mtime", "validated_at", "meta"} <= sidecar.keys()
    assert snap.to_json()["created"] == "2027-01-15T08:01:00+00:00"
    assert job_files(ring) == sorted(f"{s.id}{ext}" for s in listed for ext in (".json", ".pt"))


def test_empty_job(ring: SnapshotRing) -> None:
    assert ring.list("none") == [] and ring.newest("none") is None
    assert ring.before_newest("none") is None and ring.newest_valid("none") is None


def test_same_content_is_not_copied_again(ring: SnapshotRing, workdir: Path) -> None:
    src = write_epoch(workdir, 1)
    first = ring.add("yolo", src, job_workdir=workdir)
    src.touch()  # same bytes, new mtime
    again = ring.add("yolo", src, job_workdir=workdir)
    assert not again.saved and again.snapshot == first.snapshot
    assert "unchanged" in again.reason
    assert len(ring.list("yolo")) == 1


def test_the_file_last_taken_is_read_not_copied_and_a_broken_source_leaves_nothing(
    ring: SnapshotRing, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write_epoch(workdir, 1)
    first = ring.add("yolo", src, job_workdir=workdir)
    again = ring.add("yolo", src, job_workdir=workdir)  # same path, size and mtime: hashed, found the same
    assert not again.saved and again.snapshot == first.snapshot and "unchanged" in again.reason
    assert job_files(ring) == sorted([f"{first.snapshot.id}.pt", f"{first.snapshot.id}.json"])

    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])  # a trainer killed mid-write

    def no_copy(src_fd: int, dst_fd: int) -> tuple[str, int]:
        raise AssertionError("a file without a zip end record was copied")

    monkeypatch.setattr(snapshot_files, "copy_fd", no_copy)  # refused from its ends, a few KB read
    broken = ring.add("yolo", src, job_workdir=workdir)
    assert broken.snapshot is None and "zip" in broken.reason  # the copy's own check names the source's fault
    assert job_files(ring) == sorted([f"{first.snapshot.id}.pt", f"{first.snapshot.id}.json"])  # no half copy left


def test_same_content_copied_again_when_the_newest_copy_broke(ring: SnapshotRing, workdir: Path) -> None:
    src = write_epoch(workdir, 1)
    first = ring.add("yolo", src, job_workdir=workdir).snapshot
    assert first is not None
    first.path.write_bytes(first.path.read_bytes()[:-10])
    again = ring.add("yolo", src, job_workdir=workdir)
    assert again.saved and again.snapshot is not None and again.snapshot.id != first.id
    assert ring.newest_valid("yolo") == again.snapshot


def test_invalid_source_refused(ring: SnapshotRing, workdir: Path) -> None:
    src = workdir / "last.pt"
    src.parent.mkdir(parents=True)
    src.write_bytes(checkpoint_bytes()[:-100])
    result = ring.add("yolo", src, job_workdir=workdir)
    assert result.snapshot is None and "truncated" in result.reason
    assert ring.add("yolo", workdir / "absent.pt", job_workdir=workdir).reason == "no such file"
    assert ring.list("yolo") == []


def test_symlinks_and_outside_workdir_refused(ring: SnapshotRing, workdir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / "secret.pt"
    make_checkpoint(outside)
    workdir.mkdir()

    (workdir / "link.pt").symlink_to(outside)
    assert ring.add("yolo", workdir / "link.pt", job_workdir=workdir).reason == "source is a symlink"
    assert ring.add("yolo", workdir / "link.pt", job_workdir=None).reason == "source is a symlink"

    (workdir / "runs").symlink_to(outside.parent)  # a directory link inside the workdir
    result = ring.add("yolo", workdir / "runs" / "secret.pt", job_workdir=workdir)
    assert result.snapshot is None and "symlink" in result.reason

    result = ring.add("yolo", outside, job_workdir=workdir)
    assert result.snapshot is None and "outside the job's workdir" in result.reason
    result = ring.add("yolo", workdir / ".." / "elsewhere" / "secret.pt", job_workdir=workdir)
    assert "outside" in result.reason
    assert ring.list("yolo") == []


def test_workdir_given_through_a_symlink(ring: SnapshotRing, workdir: Path, tmp_path: Path) -> None:
    src = write_epoch(workdir, 1)
    (tmp_path / "alias").symlink_to(workdir)
    resolved_src = ring.add("yolo", src, job_workdir=tmp_path / "alias")
    assert resolved_src.saved


def test_bad_job_names(ring: SnapshotRing, workdir: Path) -> None:
    for name in ("..", "../x", "a/b", "", ".hidden", "x" * 65):
        with pytest.raises(ValueError, match="invalid job name"):
            ring.list(name)
        with pytest.raises(ValueError):
            ring.add(name, write_epoch(workdir, 1))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_keeps_last_good(
    ring: SnapshotRing, workdir: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    good = ring.add("yolo", write_epoch(workdir, 1), job_workdir=workdir).snapshot
    assert good is not None
    real_copy = snapshot_files.copy_fd

    def fills_up(src_fd: int, dst_fd: int) -> tuple[str, int]:
        os.write(dst_fd, b"partial")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(snapshot_files, "copy_fd", fills_up)
    result = ring.add("yolo", write_epoch(workdir, 2), job_workdir=workdir)
    assert result.snapshot is None and result.reason == "disk full"
    assert job_files(ring) == sorted([f"{good.id}.pt", f"{good.id}.json"])
    assert ring.newest_valid("yolo") == good

    monkeypatch.setattr(snapshot_files, "copy_fd", real_copy)
    assert ring.add("yolo", write_epoch(workdir, 2), job_workdir=workdir).saved


def test_source_truncated_during_copy(ring: SnapshotRing, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_epoch(workdir, 1)
    real_copy = snapshot_files.copy_fd

    def trainer_rewrites(src_fd: int, dst_fd: int) -> tuple[str, int]:
        with src.open("r+b") as f:  # write_bytes truncates in place, then dies
            f.truncate(100)
        return real_copy(src_fd, dst_fd)

    monkeypatch.setattr(snapshot_files, "copy_fd", trainer_rewrites)
    result = ring.add("yolo", src, job_workdir=workdir)
    assert result.snapshot is None and "source changed during copy" in result.reason
    assert not (ring.root / "yolo").exists() or job_files(ring) == []


def test_leftovers_cleaned_at_startup(tmp_path: Path, workdir: Path, clock: Clock) -> None:
    root = tmp_path / "snapshots"
    ring = SnapshotRing(root, max_bytes=10**9, clock=clock)
    good = ring.add("yolo", write_epoch(workdir, 1), job_workdir=workdir).snapshot
    assert good is not None
    (root / "yolo" / ".tmp-0123.pt").write_bytes(b"half a copy")
    (root / "yolo" / ".tmp-4567.json").write_bytes(b"{")
    orphan = root / "yolo" / "20270115T090000Z-000009-deadbeef.json"
    orphan.write_text("{}")

    reopened = SnapshotRing(root, max_bytes=10**9, clock=clock)
    assert job_files(reopened) == sorted([f"{good.id}.pt", f"{good.id}.json"])
    assert reopened.list("yolo") == [good]


def test_newest_valid_skips_corrupted(ring: SnapshotRing, workdir: Path, clock: Clock) -> None:
    older = ring.add("yolo", write_epoch(workdir, 1), job_workdir=workdir).snapshot
    clock.now += 60
    newer = ring.add("yolo", write_epoch(workdir, 2), job_workdir=workdir).snapshot
    assert older is not None and newer is not None
    assert ring.newest_valid("yolo") == newer

    os.utime(newer.path)  # only the mtime moved: full check, same sha -> still valid
    assert ring.newest_valid("yolo") == newer

    data = bytearray(newer.path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    newer.path.write_bytes(bytes(data))
    assert ring.newest_valid("yolo") == older

    newer.path.write_bytes(checkpoint_bytes(b"other"))  # a valid zip, but not what was recorded
    assert ring.newest_valid("yolo") == older


def three(ring: SnapshotRing, workdir: Path, clock: Clock) -> list[Snapshot]:
    """Three snapshots, newest first."""
    snaps = []
    for epoch in (1, 2, 3):
        snap = ring.add("yolo", write_epoch(workdir, epoch), job_workdir=workdir).snapshot
        assert snap is not None
        snaps.insert(0, snap)
        clock.now += 60
    return snaps


def flip_middle_byte(path: Path) -> None:
    """One byte changed in place, size and mtime as before: what the old size+mtime shortcut trusted."""
    st = path.stat()
    with path.open("r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0x01]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_get_of_a_truncated_snapshot_raises(ring: SnapshotRing, workdir: Path, clock: Clock) -> None:
    newest, middle, _ = three(ring, workdir, clock)
    with middle.path.open("r+b") as f:
        f.truncate(1200)
    message = rf"^snapshot {middle.id} of job yolo: truncated: 1200 of {middle.size} bytes$"
    with pytest.raises(SnapshotCorrupt, match=message) as exc:
        ring.get("yolo", middle.id)
    assert exc.value.snapshot.id == middle.id and exc.value.reason.startswith("truncated")
    assert ring.get("yolo", newest.id) == newest


def test_get_of_a_snapshot_with_a_flipped_byte_raises(ring: SnapshotRing, workdir: Path, clock: Clock) -> None:
    newest, middle, _ = three(ring, workdir, clock)
    flip_middle_byte(middle.path)
    message = rf"sha256 mismatch \(recorded {middle.sha256[:12]}\.\., now [0-9a-f]{{12}}\.\.\)$"
    with pytest.raises(SnapshotCorrupt, match=message):
        ring.get("yolo", middle.id)
    assert ring.get("yolo", "20270115T080000Z-000042-deadbeef") is None  # well-formed, absent


def test_get_refuses_symlinks(ring: SnapshotRing, workdir: Path, clock: Clock, tmp_path: Path) -> None:
    """A link to an intact copy is refused too: the ring's files are never followed."""
    newest, middle, _ = three(ring, workdir, clock)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    copy = elsewhere / middle.path.name
    copy.write_bytes(middle.path.read_bytes())
    middle.path.unlink()
    middle.path.symlink_to(copy)
    with pytest.raises(SnapshotCorrupt, match="a symlink, not a snapshot file"):
        ring.get("yolo", middle.id)

    jobdir = ring.root / "yolo"
    jobdir.rename(elsewhere / "yolo")
    jobdir.symlink_to(elsewhere / "yolo")
    with pytest.raises(SnapshotCorrupt, match="a symlink in the snapshot's path"):
        ring.get("yolo", newest.id)


def test_newest_valid_falls_back_and_reports_each_broken_one(ring: SnapshotRing, workdir: Path, clock: Clock) -> None:
    newest, middle, oldest = three(ring, workdir, clock)
    flip_middle_byte(newest.path)
    reported: list[tuple[str, str]] = []

    def on_corrupt(snap: Snapshot, reason: str) -> None:
        reported.append((snap.id, reason))

    assert ring.newest_valid("yolo", on_corrupt=on_corrupt) == middle
    assert len(reported) == 1 and reported[0][0] == newest.id and reported[0][1].startswith("sha256 mismatch")

    middle.path.write_bytes(b"")
    reported.clear()
    assert ring.newest_valid("yolo", on_corrupt=on_corrupt) == oldest
    assert [r[0] for r in reported] == [newest.id, middle.id]
    assert reported[1][1] == f"truncated: 0 of {middle.size} bytes"


def test_before_newest_is_one_valid_step_back(ring: SnapshotRing, workdir: Path, clock: Clock) -> None:
    """As documented: the second newest valid one; broken ones are skipped and reported, not raised."""
    newest, middle, oldest = three(ring, workdir, clock)
    reported: list[str] = []
    flip_middle_byte(middle.path)  # the usual candidate is broken
    assert ring.before_newest("yolo", on_corrupt=lambda snap, reason: reported.append(snap.id)) == oldest
    assert reported == [middle.id]

    middle.path.write_bytes(newest.path.read_bytes())  # readable again, but not what was recorded
    flip_middle_byte(newest.path)  # the newest broken: a restart resumes from `oldest`, nothing is before it
    assert ring.newest_valid("yolo") == oldest
    assert ring.before_newest("yolo") is None


def test_list_marks_validity_without_reading(
    ring: SnapshotRing, workdir: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    newest, middle, oldest = three(ring, workdir, clock)
    reopened = SnapshotRing(ring.root, keep_newest=3, max_bytes=10**9, clock=clock)
    assert [s.valid for s in ring.list("yolo")] == [True, True, True]  # checked when they were added
    assert [s.valid for s in reopened.list("yolo")] == [None, None, None]  # not by this ring (a new daemon)
    reopened.get("yolo", middle.id)
    with oldest.path.open("r+b") as f:
        f.truncate(100)
    flip_middle_byte(newest.path)

    def no_reads(*args: object, **kwargs: object) -> None:
        raise AssertionError("list() read a snapshot")

    monkeypatch.setattr(snapshot_check, "verify_fd", no_reads)
    listed = reopened.list("yolo")
    assert [s.valid for s in listed] == [None, True, False]  # a flipped byte shows only after a full check
    assert listed[2].to_json()["problem"] == f"truncated: 100 of {oldest.size} bytes"
    assert listed[2] == oldest  # validity is not part of a snapshot's identity
    assert "problem" not in listed[1].to_json() and listed[1].to_json()["valid"] is True


def test_verification_does_not_hold_the_ring_lock(
    ring: SnapshotRing, workdir: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large snapshot takes seconds to hash; adds and prunes must not wait for it."""
    newest, _, _ = three(ring, workdir, clock)
    monkeypatch.setattr(snapshot_check, "RECENT_S", 0.0)  # the add's own verdict is not fresh enough: read
    real = snapshot_check.verify_fd
    held: list[bool] = []

    def spy(fd: int, *, size: int, sha256: str) -> str | None:
        held.append(ring._lock.locked())
        return real(fd, size=size, sha256=sha256)

    monkeypatch.setattr(snapshot_check, "verify_fd", spy)
    assert ring.newest_valid("yolo") == newest
    assert held == [False]


def test_a_snapshot_just_written_is_handed_out_unread_until_it_changes_or_its_check_is_old(
    ring: SnapshotRing, workdir: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart right after the copy: a second read would check the page cache, not the disk."""
    newest, middle, _ = three(ring, workdir, clock)
    real, reads = snapshot_check.verify_fd, []

    def counted(fd: int, *, size: int, sha256: str) -> str | None:
        reads.append(sha256)
        return real(fd, size=size, sha256=sha256)

    monkeypatch.setattr(snapshot_check, "verify_fd", counted)
    assert ring.newest_valid("yolo") == newest and reads == []  # its add's verdict, seconds old
    flip_middle_byte(newest.path)  # size and mtime as before: the ctime moved
    assert ring.newest_valid("yolo") == middle and reads == [newest.sha256]  # read, found broken, skipped
    later = snapshot_check.monotonic() + snapshot_check.RECENT_S
    monkeypatch.setattr(snapshot_check, "monotonic", lambda: later)
    assert ring.newest_valid("yolo") == middle and reads == [newest.sha256, newest.sha256, middle.sha256]


def test_remove_job(ring: SnapshotRing, workdir: Path) -> None:
    ring.add("yolo", write_epoch(workdir, 1), job_workdir=workdir)
    ring.remove_job("yolo")
    assert ring.list("yolo") == [] and not (ring.root / "yolo").exists()
    ring.remove_job("yolo")  # again: nothing to do


# ---- retention ---------------------------------------------------------------------


def fake(seq: int, age_h: float, size: int = 100) -> Snapshot:
    return Snapshot(
        id=f"s{seq}", path=Path(f"/x/s{seq}.pt"), size=size, created=T0 - age_h * HOUR, sha256="0" * 64, seq=seq
    )


def ids(snaps: list[Snapshot]) -> list[str]:
    return [s.id for s in snaps]


def test_bands() -> None:
    assert [band(h * HOUR) for h in (0, 0.99, 1, 1.9, 2, 3.9, 4, 100)] == [0, 0, 1, 1, 2, 2, 3, 7]


def test_retention_keeps_newest_and_oldest_per_band() -> None:
    ages = [0.0, 0.1, 0.2, 0.3, 0.5, 0.9, 1.2, 1.8, 2.5, 3.5, 5.0, 7.0, 20.0, 30.0, 100.0]
    snaps = [fake(len(ages) - i, age) for i, age in enumerate(ages)]  # newest (highest seq) first
    kept = select_retained(snaps, now=T0, keep_newest=3, max_bytes=10**9, protect="s15")
    # newest 3; band 0 -> 0.9h; band 1 -> 1.8h; band 2 -> 3.5h; band 3 -> 7h; band 5 -> 30h; band 7 -> 100h
    assert ids(kept) == ["s15", "s14", "s13", "s10", "s8", "s6", "s4", "s2", "s1"]


def test_retention_max_bytes_drops_oldest_never_the_protected() -> None:
    snaps = [fake(5, 0, 400), fake(4, 1, 300), fake(3, 2, 200), fake(2, 4, 100), fake(1, 8, 100)]
    kept = select_retained(snaps, now=T0, keep_newest=5, max_bytes=750, protect="s5")
    assert ids(kept) == ["s5", "s4"]
    alone = select_retained(snaps, now=T0, keep_newest=5, max_bytes=10, protect="s5")
    assert ids(alone) == ["s5"]


def test_ring_applies_retention_after_each_add(tmp_path: Path, workdir: Path, clock: Clock) -> None:
    size = len(checkpoint_bytes(b"\x00" * 2048))
    ring = SnapshotRing(tmp_path / "snapshots", keep_newest=2, max_bytes=4 * size, clock=clock)
    added = []
    for epoch in range(8):  # one per 10 minutes: the oldest ages into band 1 at the 7th
        snap = ring.add("yolo", write_epoch(workdir, epoch), job_workdir=workdir).snapshot
        assert snap is not None
        added.append(snap)
        clock.now += 600
    assert ids(ring.list("yolo")) == ids([added[7], added[6], added[4], added[0]])
    assert len(job_files(ring)) == 8

    # with a byte cap below even one snapshot, the newest still stays
    tight = SnapshotRing(ring.root, keep_newest=2, max_bytes=1, clock=clock)
    newest = tight.add("yolo", write_epoch(workdir, 99), job_workdir=workdir).snapshot
    assert tight.list("yolo") == [newest]
