"""Crash-safe file replacement for checkpoints and small state files.

A plain `write_bytes` truncates the old file first, so a kill mid-write
leaves neither the old nor the new content. Writing to a temp file in the
same directory, fsyncing it and renaming it over the target means a reader
(or a resume after SIGKILL) sees either the complete old file or the
complete new one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHUNK = 1 << 20  # bytes per os.write; bounded so a huge buffer is not copied at once


def temp_path(target: Path, suffix: str = "") -> Path:
    """The one temp name used for `target` (same dir, so os.replace is a rename).

    A fixed name means a temp left behind by a killed writer is simply
    overwritten by the next write instead of piling up. A second writer that
    cannot wait for the first uses its own `suffix`.
    """
    return target.with_name(f".{target.name}{suffix}.partial")


def write_bytes_atomic(target: Path, data: bytes | memoryview) -> None:
    """Replace `target` with `data`, all or nothing, durable once it returns."""
    with replacing(target) as tmp:  # it fsyncs, renames, and removes the temp file on failure
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view[:CHUNK])
                view = view[written:]
        finally:
            os.close(fd)


@contextmanager
def replacing(target: Path, tmp_suffix: str = "") -> Iterator[Path]:
    """Yield a temp path to write with any library; on success it replaces `target`.

    For writers that insist on a file name (torch.save): if the body raises or
    writes nothing, `target` is left as it was, and so is no temp file.
    """
    tmp = temp_path(target, tmp_suffix)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        if tmp.exists():
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            commit(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a write that failed (a full disk) leaves no part behind to keep it full
        raise


def commit(tmp: Path, target: Path) -> None:
    """Rename `tmp` over `target` and make the rename itself durable."""
    os.replace(tmp, target)
    dfd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
