"""The trainer's side of a warm standby: wait until gpuguard hands over the GPUs.

gpuguard may start the next attempt of a job early, while the current one
still trains, with `GPUGUARD_STANDBY=1`, `CUDA_VISIBLE_DEVICES=""` and no
`GPUGUARD_ATTEMPT`. Such a standby imports and builds what needs no GPU, then
calls `wait_until_started()`. When the running attempt fails, gpuguard writes
the hand-over file (`GPUGUARD_STANDBY_FILE`, atomically, by rename) and this
call sets `CUDA_VISIBLE_DEVICES`, `GPUGUARD_ATTEMPT` and `GPUGUARD_RESUME_FROM`
from it and returns. Outside a standby it returns at once, so a trainer calls
it unconditionally. Standard library only: any trainer can import it without
the daemon's dependencies.

CUDA must not be initialised before the call: a CUDA runtime that started with
`CUDA_VISIBLE_DEVICES=""` sees no GPU for the rest of the process's life.
"""

from __future__ import annotations

import os
import sys
import time

from gpuguard import contract, jobfile

POLL_S = 0.01  # how often the hand-over file is looked for (stdlib only: no inotify)
# what the hand-over sets, CUDA_VISIBLE_DEVICES first
HANDED_OVER = (contract.CUDA_VISIBLE_DEVICES, contract.ENV_ATTEMPT, contract.ENV_RESUME_FROM)


class HandOverError(RuntimeError):
    """The hand-over cannot be taken: no file named, a malformed file, or CUDA already initialised."""


def in_standby() -> bool:
    """True while this process is a standby that has not been told to start."""
    return os.environ.get(contract.ENV_STANDBY) == "1"


def wait_until_started(timeout_s: float | None = None, poll_s: float = POLL_S) -> dict[str, str]:
    """Block until gpuguard hands over the GPUs (at once outside a standby).

    Returns the job's values of HANDED_OVER (those set) after the hand-over;
    raises TimeoutError past timeout_s and HandOverError for an unusable
    hand-over or when CUDA was initialised while the GPUs were hidden.
    """
    if not in_standby():
        return {key: os.environ[key] for key in HANDED_OVER if key in os.environ}
    path = os.environ.get(contract.ENV_STANDBY_FILE)
    if not path:
        raise HandOverError(f"{contract.ENV_STANDBY}=1 without {contract.ENV_STANDBY_FILE}")
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while (told := _read(path)) is None:
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"no hand-over at {path} within {timeout_s:g}s")
        time.sleep(poll_s)
    if _cuda_initialised():
        raise HandOverError("CUDA was initialised before the hand-over: it cannot see the GPUs handed over")
    for key in HANDED_OVER:  # CUDA_VISIBLE_DEVICES first: nothing may see a GPU list half set
        if key in told:
            os.environ[key] = told[key]
        else:
            os.environ.pop(key, None)
    # children (DDP workers, torchrun) must not wait for a hand-over of their own
    os.environ.pop(contract.ENV_STANDBY, None)
    os.environ.pop(contract.ENV_STANDBY_FILE, None)
    return {key: told[key] for key in HANDED_OVER if key in told}


def _read(path: str) -> dict[str, str] | None:
    """The hand-over, or None while it is not there. The daemon renames it into
    place whole, so a file that exists is complete."""
    try:
        told = jobfile.read_json(path)
    except FileNotFoundError:
        return None
    except ValueError:
        told = None
    if (
        not isinstance(told, dict)
        or contract.CUDA_VISIBLE_DEVICES not in told
        or contract.ENV_ATTEMPT not in told
        or not all(key in HANDED_OVER and isinstance(value, str) for key, value in told.items())
    ):
        raise HandOverError(f"{path} is not a gpuguard hand-over")
    return told


def _cuda_initialised() -> bool:
    """Did torch (if this process imported it) already start CUDA?"""
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    try:
        return bool(cuda is not None and cuda.is_initialized())
    except Exception:  # a torch without CUDA support
        return False
