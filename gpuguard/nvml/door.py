"""The one door to pynvml: every NVML function the backend calls goes through here.

One place resolves versioned functions (the newest one the binding and driver
have, probed once), turns a value NVML cannot give into None for optional
calls, classifies errors (errors.py) and puts work on a GPU's deadline lane
(deadline.py), as nvitop's `nvmlQuery` is that library's one entry point.
Errors of required calls are the binding's own exceptions, so callers and the
daemon see what pynvml raised.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from gpuguard.nvml.backend import BackendUnavailable
from gpuguard.nvml.deadline import DeadlineRunner
from gpuguard.nvml.errors import NVML_ERRORS, NotAvailable, classify, is_function_not_found, log_function_not_found
from gpuguard.nvml.types import GpuInfo, NvmlFinding

log = structlog.get_logger(__name__)

T = TypeVar("T")

GLOBAL_LANE = "global"  # the lane of calls about no one GPU (init, shutdown, system facts)


@dataclass(eq=False)
class Gpu:
    """One GPU's handle and what its lane has learnt about it."""

    info: GpuInfo
    handle: Any  # None: NVML no longer enumerates it (`lost` says so)
    lost: NvmlFinding | None = None
    unsupported: set[str] = field(default_factory=set)  # reads not asked again
    nvlinks: list[int] | None = None  # the links it has, probed once
    call: str = ""  # the NVML function its lane is in (or was last in)


class NvmlDoor:
    """Calls into the pynvml module (or a stand-in for it), and the lanes they run on."""

    def __init__(self, runner: DeadlineRunner, module: Any = None) -> None:
        """`module` stands in for pynvml (tests); None imports pynvml on load()."""
        self._runner = runner
        self._nvml = module
        self._chosen: dict[tuple[str, ...], str] = {}  # versioned family -> the one that works

    def load(self) -> None:
        """Import pynvml unless a module was given; BackendUnavailable without it."""
        if self._nvml is not None:
            return
        try:
            self._nvml = importlib.import_module("pynvml")
        except ImportError as exc:
            raise BackendUnavailable("NVML unavailable: the nvidia-ml-py package (pynvml) is not installed") from exc

    # --- calls ---------------------------------------------------------------
    def call(self, fn: str | tuple[str, ...], *args: Any, gpu: Gpu | None = None, optional: bool = False) -> Any:
        """NVML's `fn(*args)` on the calling thread; bytes come back as str.

        `fn` as a tuple is a versioned family, newest first: the first name the
        binding has is tried, a driver without it falls back to the next, and
        the one that works is kept for every later call. `gpu`: the call is
        about that GPU, on its lane: its handle goes first and the lane records
        the call (so a deadline names it). `optional`: a value NVML cannot give
        is None, and so is a health error, which is logged; without it every
        NVML error is raised as the binding raised it.
        """
        versioned = not isinstance(fn, str)
        family = (fn,) if isinstance(fn, str) else fn
        names = self._candidates(family) if versioned else family
        handle = () if gpu is None else (gpu.handle,)
        for i, name in enumerate(names):
            if gpu is not None:
                gpu.call = name
            try:
                result = getattr(self._nvml, name)(*handle, *args)
            except NVML_ERRORS as exc:
                missing = is_function_not_found(exc)
                if missing and i + 1 < len(names):
                    log_function_not_found(name)
                    continue
                if versioned and not missing:
                    self._chosen[family] = name
                return self._failed(exc, name, optional)
            if versioned:
                self._chosen[family] = name
            return result.decode() if isinstance(result, bytes) else result
        if gpu is not None:
            gpu.call = family[0]
        return self._failed(self._nvml.NVMLError_FunctionNotFound(), family[0], optional)

    def _candidates(self, family: tuple[str, ...]) -> tuple[str, ...]:
        chosen = self._chosen.get(family)
        return (chosen,) if chosen else tuple(name for name in family if hasattr(self._nvml, name))

    def _failed(self, exc: BaseException, call: str, optional: bool) -> None:
        if not optional:
            raise exc
        outcome = classify(exc, call)
        if isinstance(outcome, NvmlFinding):
            log.warning("nvml_read_failed", call=call, kind=outcome.kind.value, error=outcome.detail)
        return None

    def failure(self, exc: BaseException, gpu: Gpu) -> NotAvailable | NvmlFinding:
        """What an error (or a deadline) of the call `gpu`'s lane is in means."""
        return classify(exc, gpu.call or "poll")

    def error(self, code: int) -> BaseException:
        """The binding's exception for an nvmlReturn_t code (one field of nvmlDeviceGetFieldValues)."""
        return self._nvml.NVMLError(code)

    def constant(self, name: str, optional: bool = False) -> Any:
        """An NVML constant; with `optional`, None on a binding that lacks it."""
        return getattr(self._nvml, name, None) if optional else getattr(self._nvml, name)

    # --- lanes ---------------------------------------------------------------
    def on_lane(self, lane: Hashable, what: str, work: Callable[[], T], timeout_s: float) -> T:
        """work() on the lane; DeadlineExceeded after timeout_s (or while the lane is stuck)."""
        return self._runner.call(lane, what, work, timeout_s)

    def on_lanes(
        self, jobs: Iterable[tuple[Hashable, str, Callable[[], T]]], timeout_s: float
    ) -> dict[Hashable, T | BaseException]:
        """One job per lane, in parallel, under one shared deadline: per lane the
        result or the exception (DeadlineExceeded for a lane that overran)."""
        return self._runner.map(jobs, timeout_s)
