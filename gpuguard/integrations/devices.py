"""Where the host copy's tensors go: host buffers, CUDA events and side streams.

On the CPU each of these is a plain copy or nothing; on a GPU the copies run
on a side stream that waits only for the event recorded where they may read,
so they overlap the trainer's next forward and backward passes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def side_stream(event: Any) -> Iterator[None]:
    """On a GPU: run the block on a fresh stream that waits for `event` only (not behind a kernel
    queued since, a stuck one included), and wait for the block's work at its end."""
    if event is None:
        yield
        return
    import torch

    stream = torch.cuda.Stream()
    stream.wait_event(event)
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()


def host_like(src: Any) -> Any:
    """A host buffer for `src`: pinned when `src` is on a GPU, so copies into it can be asynchronous."""
    import torch

    return torch.empty(src.shape, dtype=src.dtype, pin_memory=src.is_cuda)


def on_gpu(trainer: Any) -> bool:
    return getattr(trainer.device, "type", "cpu") == "cuda"


def record_event(trainer: Any) -> Any:
    """On a GPU: the point in the trainer's stream after which the copy may read."""
    import torch

    if not on_gpu(trainer):
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def copy_all(copies: list[tuple[Any, Any]], event: Any, stream: Any) -> None:
    """Every (destination, source) pair: on the CPU in place, on a GPU on `stream` after `event`."""
    import torch

    if event is None:
        copy_into([dst for dst, _ in copies], [src for _, src in copies])
        return
    with torch.cuda.stream(stream), torch.no_grad():
        stream.wait_event(event)
        for dst, src in copies:
            dst.copy_(src, non_blocking=True)
    stream.synchronize()


def copy_into(dsts: list[Any], srcs: list[Any]) -> None:
    """Each source into its destination on the CPU or within one device: one call for all (a copy a
    call costs microseconds of Python each, and a model has hundreds of tensors)."""
    import torch

    with torch.no_grad():
        torch._foreach_copy_(dsts, srcs)
