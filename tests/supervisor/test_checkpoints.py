"""Checkpoint validation on zip files shaped like torch.save's, built without torch."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
from pathlib import Path

import pytest

from checkpoint_files import checkpoint_bytes, make_checkpoint
from gpuguard.supervisor import checkpoints
from gpuguard.supervisor.checkpoints import validate


def test_good_checkpoint(tmp_path: Path) -> None:
    data = make_checkpoint(tmp_path / "last.pt", os.urandom(20_000))
    check = validate(tmp_path / "last.pt")
    assert check.ok and check.reason == "ok"
    assert check.size == len(data)
    assert check.sha256 == hashlib.sha256(data).hexdigest()
    assert check.mtime == (tmp_path / "last.pt").stat().st_mtime


def test_top_level_data_pkl_accepted(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("data.pkl", pickle.dumps({"a": 1}))
    (tmp_path / "c.pt").write_bytes(buf.getvalue())
    assert validate(tmp_path / "c.pt").ok


def test_every_truncation_rejected(tmp_path: Path) -> None:
    data = checkpoint_bytes(os.urandom(50_000))
    path = tmp_path / "last.pt"
    offsets = sorted({len(data) * i // 20 for i in range(20)} | {len(data) - 1, len(data) - 22})
    for offset in offsets:
        path.write_bytes(data[:offset])
        check = validate(path)
        assert not check.ok, f"truncation at {offset} of {len(data)} accepted"
        assert check.sha256 is None
    path.write_bytes(data)
    assert validate(path).ok


def test_crc_corruption_in_the_middle_rejected(tmp_path: Path) -> None:
    payload = os.urandom(40_000)
    data = bytearray(checkpoint_bytes(payload))
    at = bytes(data).index(payload) + len(payload) // 2
    data[at] ^= 0xFF
    (tmp_path / "c.pt").write_bytes(bytes(data))
    check = validate(tmp_path / "c.pt")
    assert not check.ok
    assert "CRC" in check.reason


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (b"garbage" * 100, "not a zip checkpoint"),
        (pickle.dumps({"legacy": True}, protocol=2), "not a zip checkpoint"),  # pre-1.6 torch format
        (b"PK\x03\x04" + b"\x00" * 200, "truncated or corrupt zip"),
    ],
)
def test_bad_content_rejected(tmp_path: Path, content: bytes, reason: str) -> None:
    (tmp_path / "c.pt").write_bytes(content)
    check = validate(tmp_path / "c.pt")
    assert not check.ok
    assert check.reason.startswith(reason)


def test_zip_without_data_pkl_rejected(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("archive/notes.txt", b"hello")
    (tmp_path / "c.pt").write_bytes(buf.getvalue())
    assert "no data.pkl" in validate(tmp_path / "c.pt").reason


def test_zip_bomb_rejected_without_inflating(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(1))
        archive.writestr("archive/data/0", b"\x00" * (64 << 20))
    (tmp_path / "c.pt").write_bytes(buf.getvalue())
    assert "implausible" in validate(tmp_path / "c.pt").reason


def test_missing_directory_and_fifo(tmp_path: Path) -> None:
    assert validate(tmp_path / "nope.pt").reason == "no such file"
    assert validate(tmp_path).reason == "is a directory"
    os.mkfifo(tmp_path / "fifo")
    assert validate(tmp_path / "fifo").reason == "not a regular file"  # and it did not block


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the tests run as root, where chmod 000 does not deny: make open() refuse as the kernel would
    make_checkpoint(tmp_path / "c.pt")

    def deny(*args: object, **kwargs: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpoints.os, "open", deny)
    check = validate(tmp_path / "c.pt")
    assert not check.ok and check.reason == "permission denied"


def test_file_growing_during_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    make_checkpoint(path)
    real = checkpoints._check_member

    def writer_appends(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> None:
        real(archive, member)
        with path.open("ab") as f:  # the trainer is still writing
            f.write(b"x")

    monkeypatch.setattr(checkpoints, "_check_member", writer_appends)
    assert validate(path).reason == "changed while validating"


def test_file_replaced_during_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    make_checkpoint(path)
    make_checkpoint(tmp_path / "next.pt", epoch=4)
    real = checkpoints._sha256

    def replaced_meanwhile(fd: int, size: int) -> str:
        os.replace(tmp_path / "next.pt", path)
        return real(fd, size)

    monkeypatch.setattr(checkpoints, "_sha256", replaced_meanwhile)
    assert validate(path).reason == "changed while validating"


def test_verify_against_a_record(tmp_path: Path) -> None:
    """A snapshot's re-check: size, then sha256, then the zip structure."""
    path = tmp_path / "snap.pt"
    data = make_checkpoint(path)
    sha = hashlib.sha256(data).hexdigest()

    def verify(recorded_size: int = len(data), recorded_sha: str = sha) -> str | None:
        fd = os.open(path, os.O_RDONLY)
        try:
            return checkpoints.verify_fd(fd, size=recorded_size, sha256=recorded_sha)
        finally:
            os.close(fd)

    assert verify() is None
    assert verify(recorded_size=len(data) + 5) == f"truncated: {len(data)} of {len(data) + 5} bytes"
    assert verify(recorded_size=len(data) - 5) == f"grown: {len(data)} bytes, {len(data) - 5} recorded"
    assert verify(recorded_sha="ab" * 32) == f"sha256 mismatch (recorded {'ab' * 6}.., now {sha[:12]}..)"
    # a record that matches a broken file (written by hand, or fetched along with it): the zip check catches it
    broken = data[:-30] + b"\x00" * 30
    path.write_bytes(broken)
    reason = verify(recorded_sha=hashlib.sha256(broken).hexdigest())
    assert reason is not None and reason.startswith("truncated or corrupt zip")
