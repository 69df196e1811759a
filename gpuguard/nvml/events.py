"""NVML events (Xid, ECC) for the daemon's event thread.

Waiting blocks by design, so these calls go through the door on the event
thread itself, never on a GPU's poll lane, and in slices of at most
EVENT_SLICE_S so that close() is never kept waiting long. Registration
happens on the first wait, once per open.
"""

from __future__ import annotations

import ctypes
import threading
import time
from typing import Any

import structlog

from gpuguard.nvml.door import Gpu, NvmlDoor
from gpuguard.nvml.errors import NVML_ERRORS, is_timeout
from gpuguard.nvml.types import NvmlEvent

log = structlog.get_logger(__name__)

# the longest single nvmlEventSetWait, so close() never waits long on the event thread
EVENT_SLICE_S = 0.5
EVENT_DRAIN_MAX = 64

EVENT_WAIT_FNS = ("nvmlEventSetWait_v2", "nvmlEventSetWait")

# the nvmlEventType bits the daemon registers, by their NvmlEvent name
EVENT_KINDS = (
    ("nvmlEventTypeXidCriticalError", "xid"),
    ("nvmlEventTypeDoubleBitEccError", "ecc_dbe"),
    ("nvmlEventTypeSingleBitEccError", "ecc_sbe"),
)


class NvmlEvents:
    """One event set over the GPUs of one open(), registered on the first wait."""

    def __init__(self, door: NvmlDoor) -> None:
        self._door = door
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._gpus: list[Gpu] = []
        self._event_set: Any = None
        self._ready = False
        self._registered: dict[str, list[str]] = {}
        self._uuid_by_handle: dict[int | None, str] = {}

    def start(self, gpus: list[Gpu]) -> None:
        """Forget the last open's event set; the next wait registers these GPUs."""
        self._gpus = gpus
        self._event_set, self._ready, self._registered, self._uuid_by_handle = None, False, {}, {}
        self._closing.clear()

    def stop(self, wait_s: float) -> None:
        """End any wait and free the event set, waiting up to wait_s for the event thread."""
        self._closing.set()
        if self._lock.acquire(timeout=wait_s):
            try:
                self._free_event_set()
            finally:
                self._lock.release()
        else:
            log.warning("nvml_event_set_not_freed", reason="the event thread is stuck in nvmlEventSetWait")

    def registered(self) -> dict[str, list[str]]:
        """Per GPU UUID, the event types NVML accepted ("xid", "ecc_dbe", "ecc_sbe")."""
        with self._lock:
            return {uuid: list(kinds) for uuid, kinds in self._registered.items()}

    def wait(self, timeout_s: float) -> list[NvmlEvent]:
        """Block up to timeout_s; the events that came, or [] (also after stop())."""
        end = time.monotonic() + timeout_s
        while (left := end - time.monotonic()) > 0 and not self._closing.is_set():
            with self._lock:
                if self._closing.is_set():
                    break
                if not self._ready:
                    self._register()
                if self._event_set is None:
                    break
                data = self._wait_one(min(left, EVENT_SLICE_S))
                if data is not None:
                    return self._drain(data)
        if self._event_set is None:
            self._closing.wait(max(0.0, end - time.monotonic()))
        return []

    def _kinds(self) -> dict[int, str]:
        return {self._door.constant(bit): kind for bit, kind in EVENT_KINDS}

    def _register(self) -> None:
        door = self._door
        kinds = self._kinds()
        self._ready = True
        try:
            event_set = door.call("nvmlEventSetCreate")
        except NVML_ERRORS as exc:
            log.warning("nvml_events_unavailable", call="nvmlEventSetCreate", error=str(exc))
            return
        for gpu in self._gpus:
            if gpu.handle is None:
                continue
            accepted = []
            try:
                # the handle as an argument, not gpu=: this thread is not the GPU's lane
                supported = int(door.call("nvmlDeviceGetSupportedEventTypes", gpu.handle))
                for bit, kind in kinds.items():
                    if supported & bit:
                        try:
                            door.call("nvmlDeviceRegisterEvents", gpu.handle, bit, event_set)
                        except NVML_ERRORS as exc:
                            log.warning("nvml_event_not_registered", gpu_uuid=gpu.info.uuid, type=kind, error=str(exc))
                        else:
                            accepted.append(kind)
            except NVML_ERRORS as exc:
                log.warning("nvml_events_not_registered", gpu_uuid=gpu.info.uuid, error=str(exc))
            self._registered[gpu.info.uuid] = accepted
            self._uuid_by_handle[_address(gpu.handle)] = gpu.info.uuid
        if any(self._registered.values()):
            self._event_set = event_set
            log.info("nvml_events_registered", gpus=self._registered)
        else:
            door.call("nvmlEventSetFree", event_set)
            log.info("nvml_events_unavailable", reason="no GPU accepts Xid or ECC events")

    def _wait_one(self, timeout_s: float) -> Any:
        """One event's data, or None when none came within timeout_s."""
        try:
            return self._door.call(EVENT_WAIT_FNS, self._event_set, int(timeout_s * 1000))
        except NVML_ERRORS as exc:
            if is_timeout(exc):
                return None
            raise

    def _drain(self, first: Any) -> list[NvmlEvent]:
        """The event that woke us and those already queued behind it."""
        events = [self._event(first)]
        while len(events) < EVENT_DRAIN_MAX and (data := self._wait_one(0)) is not None:
            events.append(self._event(data))
        return events

    def _event(self, data: Any) -> NvmlEvent:
        event_type = int(data.eventType)
        uuid = self._uuid_by_handle.get(_address(data.device), "")
        kind = self._kinds().get(event_type, f"0x{event_type:x}")
        return NvmlEvent(uuid, kind, int(data.eventData), time.time())

    def _free_event_set(self) -> None:
        if self._event_set is None:
            return
        try:
            self._door.call("nvmlEventSetFree", self._event_set)
        except NVML_ERRORS as exc:
            log.warning("nvml_event_set_free_failed", error=str(exc))
        self._event_set = None


def _address(handle: Any) -> int | None:
    """A device handle's pointer value, the same for every copy of the handle."""
    return ctypes.cast(handle, ctypes.c_void_p).value
