"""Is this file a complete torch checkpoint? Answered without torch.

`torch.save` (zip format, the default since torch 1.6) is not atomic and
Ultralytics writes `last.pt` with a plain `write_bytes`, so a kill mid-write
leaves a truncated file. A zip archive carries its own proof of completeness:
the central directory sits at the very end and every member has a CRC-32.
The legacy (pre-1.6) pickle format has neither, so it is rejected rather than
guessed at. Nothing here unpickles or executes anything, and the file is
streamed in bounded chunks, never loaded whole.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20
_ZIP_MAGIC = b"PK\x03\x04"
_DATA_PKL = re.compile(r"^(?:[^/]+/)?data\.pkl$")
# torch stores members uncompressed; a much larger total means a zip bomb, not a checkpoint
_MAX_INFLATION = 16
_ENCRYPTED = 0x1  # general purpose flag bit 0 (APPNOTE 4.4.4)


@dataclass(frozen=True, slots=True)
class CheckpointCheck:
    ok: bool
    reason: str  # "ok" or why not, worded for a log line
    size: int  # bytes (0 when the file could not be read)
    mtime: float  # st_mtime at the start of validation (0.0 when unknown)
    sha256: str | None  # hex digest of the whole file; None unless ok


class _Reject(Exception):
    """Internal: carries the reason out of the nested checks."""


def validate(path: Path) -> CheckpointCheck:
    """Check `path` and say why it is unusable; never raises for a bad file.

    Besides the content, the path itself must still name the same unchanged
    file at the end (a rewrite or an atomic replace during validation means
    what was checked is not what a job would load).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return _bad("no such file")
    except PermissionError:
        return _bad("permission denied")
    except OSError as exc:
        return _bad(f"cannot open: {exc.strerror or exc}")
    try:
        check = validate_fd(fd)
        if check.ok and not _same_file(path, fd):
            return CheckpointCheck(False, "changed while validating", check.size, check.mtime, None)
        return check
    finally:
        os.close(fd)


def validate_fd(fd: int) -> CheckpointCheck:
    """Validate the file open at `fd` (its offset is left unspecified).

    For callers that opened the file themselves (e.g. without following
    symlinks) and will copy from the same descriptor.
    """
    try:
        before = os.fstat(fd)
    except OSError as exc:
        return _bad(f"cannot stat: {exc.strerror or exc}")
    if (refused := precheck(before)) is not None:
        return refused
    size, mtime = before.st_size, before.st_mtime
    try:
        _check_zip(fd, size)
        digest = _sha256(fd, size)
        after = os.fstat(fd)
    except _Reject as exc:
        return CheckpointCheck(False, str(exc), size, mtime, None)
    except OSError as exc:
        return CheckpointCheck(False, f"read error: {exc.strerror or exc}", size, mtime, None)
    if (after.st_size, after.st_mtime_ns) != (size, before.st_mtime_ns):
        return CheckpointCheck(False, "changed while validating", size, mtime, None)
    return CheckpointCheck(True, "ok", size, mtime, digest)


def precheck(st: os.stat_result) -> CheckpointCheck | None:
    """What the file's stat alone refuses (a directory, not a regular file, empty); None: read on."""
    if stat.S_ISDIR(st.st_mode):
        return _bad("is a directory")
    if not stat.S_ISREG(st.st_mode):
        return _bad("not a regular file")
    if st.st_size == 0:
        return CheckpointCheck(False, "empty file", 0, st.st_mtime, None)
    return None


def ends_problem(fd: int) -> str | None:
    """Why the file open at `fd` cannot be a complete zip checkpoint, from its first bytes and its
    end record alone (a few kilobytes read); None: worth reading in full. So that a truncated
    write or a file that is no checkpoint at all is refused before it is copied anywhere."""
    try:
        with open(fd, "rb", closefd=False) as raw:
            raw.seek(0)
            if raw.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
                return "not a zip checkpoint"
            if zipfile._EndRecData(raw) is None:  # type: ignore[attr-defined]
                return "truncated or corrupt zip: no end of central directory"
    except OSError as exc:
        return f"read error: {exc.strerror or exc}"
    return None


def complete_problem(fd: int, size: int) -> str | None:
    """Why the `size` bytes open at `fd` are not a complete torch checkpoint (the zip checks); None if
    they are. For bytes whose digest the caller took itself (a copy hashed as it was written)."""
    try:
        _check_zip(fd, size)
    except _Reject as exc:
        return str(exc)
    except OSError as exc:
        return f"read error: {exc.strerror or exc}"
    return None


def verify_fd(fd: int, *, size: int, sha256: str) -> str | None:
    """Why the file open at `fd` is no longer the checkpoint recorded as `size`
    bytes with `sha256`; None when it still is.

    For a copy validated earlier (a snapshot). The size costs nothing; the
    digest comes before the zip check so a changed byte is named as such, not
    as the CRC error it also causes; the zip check then still catches a record
    that never described a complete checkpoint (a sidecar written by hand or
    fetched from elsewhere with the file it describes).
    """
    try:
        before = os.fstat(fd)
    except OSError as exc:
        return f"cannot stat: {exc.strerror or exc}"
    if not stat.S_ISREG(before.st_mode):
        return "not a regular file"
    if problem := size_problem(before.st_size, size):
        return problem
    try:
        digest = _sha256(fd, size)
        if digest != sha256:
            return f"sha256 mismatch (recorded {sha256[:12]}.., now {digest[:12]}..)"
        _check_zip(fd, size)
        after = os.fstat(fd)
    except _Reject as exc:
        return str(exc)
    except OSError as exc:
        return f"read error: {exc.strerror or exc}"
    if (after.st_size, after.st_mtime_ns) != (size, before.st_mtime_ns):
        return "changed while validating"
    return None


def size_problem(actual: int, recorded: int) -> str | None:
    """The wording for a file whose size is not the recorded one; None when it is."""
    if actual < recorded:
        return f"truncated: {actual} of {recorded} bytes"
    if actual > recorded:
        return f"grown: {actual} bytes, {recorded} recorded"
    return None


def _bad(reason: str) -> CheckpointCheck:
    return CheckpointCheck(False, reason, 0, 0.0, None)


def _same_file(path: Path, fd: int) -> bool:
    """Whether `path` still names the file open at `fd`, unchanged."""
    try:
        now, held = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) == (
        held.st_dev,
        held.st_ino,
        held.st_size,
        held.st_mtime_ns,
    )


def _check_zip(fd: int, size: int) -> None:
    """Central directory, a data.pkl member, and every member's CRC-32."""
    with open(fd, "rb", closefd=False) as raw:
        raw.seek(0)  # from the start, wherever a writer left the offset
        if raw.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
            raise _Reject("not a zip checkpoint")
        raw.seek(0)
        try:
            with zipfile.ZipFile(raw) as archive:
                members = archive.infolist()
                if len(members) != _declared_entries(raw):
                    raise _Reject("central directory and end record disagree on the member count")
                if not any(_DATA_PKL.match(m.filename) for m in members):
                    raise _Reject("zip has no data.pkl: not a torch checkpoint")
                if sum(m.file_size for m in members) > _MAX_INFLATION * size + CHUNK:
                    raise _Reject("implausible uncompressed size: not a torch checkpoint")
                for member in members:
                    _check_member(archive, member)
        except zipfile.BadZipFile as exc:
            raise _Reject(f"truncated or corrupt zip: {exc}") from None
        except (EOFError, zlib.error, NotImplementedError, ValueError) as exc:
            raise _Reject(f"corrupt zip: {exc}") from None


def _declared_entries(raw: io.BufferedReader) -> int | None:
    """The member count the end-of-central-directory record declares.

    zipfile walks the central directory by its byte size and never compares
    the count, so an entry swallowed by a corrupt length field would go
    unnoticed. zipfile has no public accessor for the end record."""
    endrec = zipfile._EndRecData(raw)  # type: ignore[attr-defined]
    return None if endrec is None else int(endrec[zipfile._ECD_ENTRIES_TOTAL])  # type: ignore[attr-defined]


def _check_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> None:
    """Read one member to its end; zipfile raises BadZipFile on a CRC mismatch.

    Directory entries are read too: a name cut short by a NUL (zipfile stops
    names there) can make a data member look like a directory. An encryption
    flag is refused first: zipfile would raise RuntimeError asking for a
    password (torch never encrypts, so the flag is a corrupt byte)."""
    if member.flag_bits & _ENCRYPTED:
        raise _Reject(f"member {member.filename!r} flagged as encrypted: not a torch checkpoint")
    with archive.open(member) as stream:
        while stream.read(CHUNK):
            pass


def _sha256(fd: int, size: int) -> str:
    digest = hashlib.sha256()
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(CHUNK, size - offset), offset)
        if not chunk:
            raise _Reject("changed while validating")
        digest.update(chunk)
        offset += len(chunk)
    if os.pread(fd, 1, offset):
        raise _Reject("changed while validating")
    return digest.hexdigest()
