"""The file:// store on a directory: whole files only, a sidecar with the sha256, newest first."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuguard.storage.filestore import FileStore
from gpuguard.storage.objects import StorageMisconfigured
from gpuguard.storage.url import parse_url
from tests.storage.fakes import snap_id, snapshot_file


def store(root: Path) -> FileStore:
    return FileStore(parse_url(f"file://{root}"))


def test_put_list_get_delete(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    s = store(shared)
    s.check()
    for n in (1, 2):
        path, sha = snapshot_file(tmp_path / f"local-{n}.pt", n)
        s.put("yolo", snap_id(n), path, sha, 1000.0 + n)
    listed = s.list("yolo")
    assert [x.id for x in listed] == [snap_id(2), snap_id(1)]
    assert listed[0].url == f"file://{shared}/yolo/{snap_id(2)}.pt"
    assert listed[0].size == (tmp_path / "local-2.pt").stat().st_size
    assert sorted(p.name for p in (shared / "yolo").iterdir()) == sorted(
        f"{snap_id(n)}{ext}" for n in (1, 2) for ext in (".pt", ".json")
    )  # no temporary file left
    s.get(listed[1], tmp_path / "back.pt")
    assert (tmp_path / "back.pt").read_bytes() == (tmp_path / "local-1.pt").read_bytes()
    s.delete("yolo", snap_id(1))
    assert [x.id for x in s.list("yolo")] == [snap_id(2)]
    assert s.list("other") == []


def test_a_snapshot_without_its_sidecar_is_not_listed(tmp_path: Path) -> None:
    """A writer that died between the snapshot and its sidecar leaves nothing a reader takes."""
    s = store(tmp_path)
    path, sha = snapshot_file(tmp_path / "local.pt", 1)
    s.put("yolo", snap_id(1), path, sha, 1.0)
    (tmp_path / "yolo" / f"{snap_id(1)}.json").unlink()
    assert s.list("yolo") == []


@pytest.mark.parametrize("make", ["missing", "a file"])
def test_a_directory_that_is_not_there_is_a_lasting_mistake(tmp_path: Path, make: str) -> None:
    target = tmp_path / "shared"
    if make == "a file":
        target.write_text("")
    with pytest.raises(StorageMisconfigured) as info:
        store(target).check()
    assert f"[storage] url file://{target}" in str(info.value)
