"""Fuzzing checkpoint validation: any file gives a verdict and never an
exception, and no change to a member's bytes is ever accepted."""

from __future__ import annotations

import io
import pickle
import struct
import tempfile
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuguard.supervisor.checkpoints import CheckpointCheck, validate

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # a zip local file header, 30 bytes


def checkpoint(stored: bool = True) -> bytes:
    """A torch-shaped zip (as the scripted trainer writes it), deterministic, without stray zip signatures."""
    buf = io.BytesIO()
    method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(buf, "w", method) as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"step": 1234, "lr": 0.01}, protocol=2))
        archive.writestr("archive/data/0", bytes(range(7, 250)) * 16)
        archive.writestr("archive/version", b"3\n")
    return buf.getvalue()


ORIGINALS = {True: checkpoint(True), False: checkpoint(False)}


def member_ranges(data: bytes) -> list[tuple[int, int]]:
    """[start, end) of each member's stored bytes in the archive."""
    ranges = []
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            header = _LOCAL_HEADER.unpack_from(data, info.header_offset)
            start = info.header_offset + _LOCAL_HEADER.size + header[9] + header[10]
            ranges.append((start, start + info.compress_size))
    return ranges


def contents(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp) / "ck.pt"


def check(path: Path, data: bytes) -> CheckpointCheck:
    path.write_bytes(data)
    return validate(path)


@FUZZ
@given(data=st.one_of(st.binary(max_size=600), st.binary(max_size=600).map(lambda b: b"PK\x03\x04" + b)))
def test_arbitrary_bytes_get_a_verdict(scratch: Path, data: bytes) -> None:
    result = check(scratch, data)
    assert isinstance(result, CheckpointCheck) and isinstance(result.reason, str)
    assert result.ok is False  # nothing random is a torch checkpoint


@FUZZ
@given(stored=st.booleans(), cut=st.integers(0, 10**6))
def test_every_truncation_is_rejected(scratch: Path, stored: bool, cut: int) -> None:
    original = ORIGINALS[stored]
    result = check(scratch, original[: cut % len(original)])
    assert not result.ok and result.sha256 is None


@FUZZ
@given(where=st.integers(0, 10**6), xor=st.integers(1, 255), member=st.integers(0, 2))
def test_a_changed_byte_inside_a_member_is_rejected(scratch: Path, where: int, xor: int, member: int) -> None:
    """Stored members, as torch writes them (a deflated stream can change and inflate to the same bytes)."""
    original = ORIGINALS[True]
    start, end = member_ranges(original)[member]
    pos = start + where % (end - start)
    mutated = bytearray(original)
    mutated[pos] ^= xor
    assert not check(scratch, bytes(mutated)).ok


def outside_members(data: bytes) -> list[int]:
    """Offsets of the bytes no member CRC covers: local headers, central directory, end record."""
    inside = {i for start, end in member_ranges(data) for i in range(start, end)}
    return [i for i in range(len(data)) if i not in inside]


HEADERS = {stored: outside_members(data) for stored, data in ORIGINALS.items()}
EDITS = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4)


def test_an_accepted_mutation_has_the_original_contents(scratch: Path) -> None:
    """Whatever passes reads back as the original.

    The edits go where no CRC looks (headers, central directory, end record)
    plus a tail, because that is where zipfile ignores some fields and a
    mutation can pass at all; both verdicts must occur over the examples, or
    the property was never put to the test.
    """
    verdicts: Counter[bool] = Counter()

    @FUZZ
    @given(stored=st.booleans(), edits=EDITS, tail=st.binary(max_size=40))
    def mutate(stored: bool, edits: list[tuple[int, int]], tail: bytes) -> None:
        original, offsets = ORIGINALS[stored], HEADERS[stored]
        mutated = bytearray(original)
        for where, value in edits:
            mutated[offsets[where % len(offsets)]] = value
        mutated += tail
        if mutated == original:
            return  # no change: evidence of nothing
        result = check(scratch, bytes(mutated))
        verdicts[result.ok] += 1
        if result.ok:
            assert contents(bytes(mutated)) == contents(original)

    mutate()
    assert verdicts[True] > 0 and verdicts[False] > 0, f"one verdict never occurred: {dict(verdicts)}"


@FUZZ
@given(
    stored=st.booleans(),
    edits=EDITS,
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
    tail=st.binary(max_size=40),
)
def test_a_mutation_anywhere_gets_a_verdict(
    scratch: Path, stored: bool, edits: list[tuple[int, int]], cut: int | None, tail: bytes
) -> None:
    """Edits, a cut and a tail together, anywhere: a verdict, never an exception, and a digest only
    with an acceptance. (What an acceptance implies is the test above; here most are rejected.)"""
    original = ORIGINALS[stored]
    mutated = bytearray(original)
    for where, value in edits:
        mutated[where % len(mutated)] = value
    if cut is not None:
        del mutated[cut % len(mutated) :]
    mutated += tail
    result = check(scratch, bytes(mutated))
    assert isinstance(result, CheckpointCheck) and result.reason
    assert (result.sha256 is not None) == result.ok


def test_an_encryption_flag_is_a_verdict_not_an_exception(scratch: Path) -> None:
    """Regression, found by the fuzzing above: a flipped flag bit in the central directory made
    zipfile raise RuntimeError (password required) out of validate()."""
    original = ORIGINALS[False]
    central = original.index(b"PK\x01\x02")
    mutated = bytearray(original)
    mutated[central + 8] |= 0x1  # general purpose flags, bit 0: encrypted
    result = check(scratch, bytes(mutated))
    assert not result.ok and "encrypted" in result.reason


def test_the_unmutated_checkpoints_pass(scratch: Path) -> None:
    for data in ORIGINALS.values():
        assert check(scratch, data).ok


def test_a_member_disguised_as_a_directory_is_still_checked(scratch: Path) -> None:
    """Regression: a NUL in the central directory's name made zipfile call a data
    member a directory, and validation skipped it, so its bytes went unchecked."""
    original = ORIGINALS[True]
    central = original.rindex(b"archive/data/0")
    start, _ = member_ranges(original)[1]
    mutated = bytearray(original)
    mutated[central + len(b"archive/data/")] = 0
    assert not check(scratch, bytes(mutated)).ok
    mutated[start] ^= 0xFF  # and with its content changed as well
    assert not check(scratch, bytes(mutated)).ok


def test_a_central_directory_entry_swallowed_by_a_comment_length_is_rejected(scratch: Path) -> None:
    """Regression: a corrupt comment length made the 2nd entry's comment swallow the
    3rd entry; zipfile listed two members, every CRC held, and the file passed."""
    original = ORIGINALS[True]
    second = original.index(b"PK\x01\x02", original.index(b"PK\x01\x02") + 1)
    mutated = bytearray(original)
    mutated[second + 33] = 1  # high byte of its comment length: 256 bytes of "comment"
    with zipfile.ZipFile(io.BytesIO(bytes(mutated))) as archive:
        assert len(archive.infolist()) == 2  # the premise: zipfile itself does not notice
    assert not check(scratch, bytes(mutated)).ok
