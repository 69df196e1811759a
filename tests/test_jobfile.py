"""The reader behind the hand-over and the fault note: what a hostile file in the
job's directory gets it (an error at once, never a hang, a link followed or a huge read)."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from gpuguard import jobfile


def test_a_small_json_file_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text('{"a": 1}')
    assert jobfile.read_json(str(path)) == {"a": 1}


def test_a_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        jobfile.read_json(str(tmp_path / "missing"))


def test_a_link_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "target").write_text('{"a": 1}')
    (tmp_path / "f").symlink_to(tmp_path / "target")
    with pytest.raises(OSError) as raised:
        jobfile.read_json(str(tmp_path / "f"))
    assert raised.value.errno == errno.ELOOP


def test_a_fifo_does_not_block(tmp_path: Path) -> None:
    """A FIFO with no writer: opened without blocking, read as empty, so not JSON."""
    os.mkfifo(tmp_path / "f")
    result: list[BaseException] = []

    def read() -> None:
        try:
            jobfile.read_json(str(tmp_path / "f"))
        except BaseException as e:  # noqa: BLE001 - the test checks which
            result.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    assert not reader.is_alive()
    assert len(result) == 1 and isinstance(result[0], ValueError)


def test_an_oversized_file_is_refused_unparsed(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b" " * jobfile.MAX_BYTES + b'{"a": 1}')
    with pytest.raises(ValueError, match="larger than"):
        jobfile.read_json(str(path))
    path.write_bytes(b" " * (jobfile.MAX_BYTES - 8) + b'{"a": 1}')
    assert jobfile.read_json(str(path)) == {"a": 1}
