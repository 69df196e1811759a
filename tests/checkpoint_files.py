"""Checkpoint files shaped like torch.save's (a zip: data.pkl, a storage blob, version
files), built without torch; for the tests of checkpoint validation, the snapshot ring
and the job's checkpoint paths. Imported as `from checkpoint_files import ...`."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path


def checkpoint_bytes(payload: bytes = b"\x00" * 4096, *, epoch: int = 3, prefix: str = "archive") -> bytes:
    """A zip laid out like torch.save's: data.pkl, a storage blob, version files; stored, not deflated."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{prefix}/data.pkl", pickle.dumps({"epoch": epoch, "w": "storage 0"}, protocol=2))
        archive.writestr(f"{prefix}/.format_version", b"1")
        archive.writestr(f"{prefix}/byteorder", b"little")
        archive.writestr(f"{prefix}/data/0", payload)
        archive.writestr(f"{prefix}/version", b"3\n")
    return buf.getvalue()


def make_checkpoint(path: Path, payload: bytes = b"\x00" * 4096, *, epoch: int = 3) -> bytes:
    data = checkpoint_bytes(payload, epoch=epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data
