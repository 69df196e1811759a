"""Why gpuguard asks a job to checkpoint: the fault note (standard library only).

Before it sends the checkpoint signal, gpuguard writes a small JSON file named
to the job by `GPUGUARD_FAULT_FILE`: the reason, the GPU it is about, and
whether that GPU is gone (fallen off the bus, lost to NVML: a reboot-class
fault). A trainer whose GPU is gone cannot finish the batch in flight: its
main thread is stuck in a CUDA call, or fails in the next one. Its rescue
thread then writes the state of the last optimizer step at once, instead of
first waiting out the time that tells a stuck trainer from a slow one.

The note is a hint: a job that never reads it loses nothing, and a note that
is missing, unreadable, malformed or another attempt's reads as no note.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from gpuguard import contract, jobfile


@dataclass(frozen=True, slots=True)
class FaultNote:
    attempt: int  # the attempt it was sent to: a note left from an earlier attempt is not this one's
    reason: str
    gpu: str | None  # the GPU the fault is on (a UUID); None when the request is not about a GPU
    gpu_lost: bool  # that GPU runs nothing any more: do not wait for the trainer to answer

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()


def read(path: str | None = None) -> FaultNote | None:
    """This attempt's note ($GPUGUARD_FAULT_FILE unless `path`), or None: never raises."""
    path = path if path is not None else os.environ.get(contract.ENV_FAULT_FILE)
    if not path:
        return None
    try:
        fields = jobfile.read_json(path)
        note = FaultNote(**fields) if isinstance(fields, dict) else None
    except (OSError, ValueError, TypeError):
        return None
    if note is None or not _well_typed(note):
        return None
    attempt = os.environ.get(contract.ENV_ATTEMPT)
    if attempt is not None and attempt != str(note.attempt):
        return None
    return note


def _well_typed(note: FaultNote) -> bool:
    return (
        type(note.attempt) is int
        and isinstance(note.reason, str)
        and (note.gpu is None or isinstance(note.gpu, str))
        and type(note.gpu_lost) is bool
    )
