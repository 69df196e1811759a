"""Reading a small JSON file gpuguard leaves for a job (standard library only).

The hand-over (job.py) and the fault note (fault.py) are written by the daemon
into a directory only it can write; the job reads them without following a
link, without blocking on a FIFO someone put in their place, and without
reading more than a small file can hold.
"""

from __future__ import annotations

import json
import os
from typing import Any

MAX_BYTES = 64 * 1024


def read_json(path: str) -> Any:
    """The decoded JSON at `path`. Raises FileNotFoundError when it is not there,
    OSError when it cannot be opened as a file (a link: ELOOP), ValueError when
    it is not JSON or is larger than MAX_BYTES."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        raw = f.read(MAX_BYTES + 1)
    if len(raw) > MAX_BYTES:
        raise ValueError(f"{path} is larger than {MAX_BYTES} bytes")
    return json.loads(raw)
