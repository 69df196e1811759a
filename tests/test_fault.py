"""The fault note's reader: a job learns why it is asked to checkpoint, and a note that is
missing, malformed, hostile or another attempt's reads as no note (never an exception)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gpuguard import contract, fault
from gpuguard.fault import FaultNote

NOTE = FaultNote(attempt=3, reason="GPU is lost: reboot the node", gpu="GPU-a", gpu_lost=True)


@pytest.fixture
def note_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "fault"
    monkeypatch.setenv(contract.ENV_FAULT_FILE, str(path))
    monkeypatch.setenv(contract.ENV_ATTEMPT, "3")
    return path


def test_a_note_reads_back_as_written(note_file: Path) -> None:
    note_file.write_bytes(NOTE.encode())
    assert fault.read() == NOTE


def test_no_variable_or_no_file_is_no_note(note_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert fault.read() is None
    note_file.write_bytes(NOTE.encode())
    monkeypatch.delenv(contract.ENV_FAULT_FILE)
    assert fault.read() is None


def test_another_attempts_note_is_not_this_ones(note_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A note left by the attempt before (a daemon that died before removing it) is ignored."""
    note_file.write_bytes(NOTE.encode())
    monkeypatch.setenv(contract.ENV_ATTEMPT, "4")
    assert fault.read() is None
    monkeypatch.delenv(contract.ENV_ATTEMPT)  # a job that does not say which attempt it is takes it
    assert fault.read() == NOTE


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[1, 2]",
        json.dumps({"attempt": 3, "reason": "x", "gpu": None}).encode(),  # a field missing
        json.dumps({"attempt": 3, "reason": "x", "gpu": None, "gpu_lost": True, "extra": 1}).encode(),
        json.dumps({"attempt": "3", "reason": "x", "gpu": None, "gpu_lost": True}).encode(),
        json.dumps({"attempt": 3, "reason": "x", "gpu": None, "gpu_lost": "yes"}).encode(),
        json.dumps({"attempt": True, "reason": "x", "gpu": None, "gpu_lost": True}).encode(),
        json.dumps({"attempt": 3, "reason": ["x"], "gpu": 7, "gpu_lost": True}).encode(),
        b"\xff\xfe garbage",
        b" " * (64 * 1024) + NOTE.encode(),  # oversized
    ],
)
def test_a_malformed_note_is_no_note(note_file: Path, raw: bytes) -> None:
    note_file.write_bytes(raw)
    assert fault.read() is None


def test_a_symlink_or_a_fifo_in_its_place_is_no_note(note_file: Path, tmp_path: Path) -> None:
    """Never followed, never blocked on: the reader runs in the rescue thread of a stuck trainer."""
    target = tmp_path / "elsewhere"
    target.write_bytes(NOTE.encode())
    note_file.symlink_to(target)
    assert fault.read() is None
    note_file.unlink()
    os.mkfifo(note_file)
    assert fault.read() is None
    note_file.unlink()
    note_file.mkdir()
    assert fault.read() is None
