"""integrations/atomic.py: a checkpoint file is replaced whole or not at all, and a failed write leaves nothing."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from gpuguard.integrations.atomic import replacing, temp_path, write_bytes_atomic


def test_a_write_that_fails_half_way_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    """A full disk mid-write: the partial temp file would keep the disk full for the next save."""
    target = tmp_path / "last.pt"
    target.write_bytes(b"the checkpoint before")
    with pytest.raises(OSError, match="No space"):
        with replacing(target) as tmp:
            tmp.write_bytes(b"half of a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_bytes() == b"the checkpoint before"
    assert not temp_path(target).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_write_that_succeeds_replaces_the_file(tmp_path: Path) -> None:
    target = tmp_path / "last.pt"
    target.write_bytes(b"old")
    with replacing(target, ".rescue") as tmp:
        assert tmp == temp_path(target, ".rescue")
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_body_that_writes_nothing_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    target = tmp_path / "last.pt"
    target.write_bytes(b"old")
    with replacing(target):
        pass
    assert target.read_bytes() == b"old"


def test_a_small_write_that_cannot_land_leaves_no_temp(tmp_path: Path) -> None:
    """Something (a directory) stands where the file goes: the error reaches the caller, no temp stays."""
    target = tmp_path / "checkpoint-path"
    target.mkdir()
    with pytest.raises(OSError):
        write_bytes_atomic(target, b"/runs/job/weights/last.pt\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-path"] and target.is_dir()
