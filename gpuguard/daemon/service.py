"""The daemon: sources feed one main loop that runs health and acts.

Threads: the kernel-log reader and the NVML event waiter push observations
onto one queue; the control server's threads read state under the lock and
ask for work through the same queue. The main loop alone polls the backend,
evaluates health, stores events and pings systemd's watchdog, so a stuck
source can never fake liveness.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Callable
from typing import Any

import structlog

from gpuguard import __version__, sdnotify
from gpuguard.actions.hooks import NodeHooks
from gpuguard.actions.reset import ResetResult, reset_argv, run_reset_command
from gpuguard.config import Config, ResetConfig
from gpuguard.daemon.monitor import Monitor, snapshot_metrics
from gpuguard.events import Event
from gpuguard.health.types import Action, GpuState, Severity
from gpuguard.kmsg.parser import PciMapping
from gpuguard.kmsg.reader import KernelLogSource
from gpuguard.nvml.backend import Backend
from gpuguard.nvml.types import DriverInfo, GpuInfo, NvmlEvent
from gpuguard.observations import XidObservation
from gpuguard.metrics import MetricsServer, start_metrics_server
from gpuguard.store import EventStore, QuarantineEntry
from gpuguard.supervisor.supervisor import Supervisor

log = structlog.get_logger("gpuguard.daemon")

PRUNE_EVERY_S = 600.0
EVENT_WAIT_S = 1.0  # one nvmlEventSetWait slice; the thread checks for stop between slices


@dataclass(frozen=True)
class _PollNow:
    """Ask the main loop for a poll at once (after an injected fault, a reset)."""


@dataclass(frozen=True)
class _Wake:
    """Run the loop's evaluation and supervisor tick now (a stop finished)."""


@dataclass(frozen=True)
class _Reload:
    """SIGHUP: read the config again."""


# Keys read once at start-up: changing them needs a restart, because they
# name the sockets, files and backend the daemon already holds open, or, for
# the checkpoint signal, what running jobs were told in their environment.
RESTART_KEYS = (
    "daemon.socket",
    "daemon.state_dir",
    "daemon.admin_group",
    "daemon.socket_mode",
    "daemon.log_format",
    "monitor.kernel_log",
    "monitor.nvml_timeout_s",
    "monitor.nvml_events",
    "jobs.checkpoint_signal",
    "jobs.snapshots_keep",
    "jobs.snapshots_max_bytes",
    "metrics.enabled",
    "metrics.address",
    "metrics.port",
)


class Daemon:
    def __init__(
        self,
        config: Config,
        backend: Backend,
        store: EventStore,
        kernel_log: Path,
        reload_config: Callable[[], Config] | None = None,
    ) -> None:
        self.config = config
        self._reload_config = reload_config
        self.backend = backend
        self.store = store
        self.kernel_log_path = kernel_log
        self.lock = threading.RLock()
        self.queue: queue.Queue[Any] = queue.Queue()
        self.stopping = threading.Event()
        self.started_at = time.time()
        self.last_poll_at: float | None = None
        self.resetting: set[str] = set()
        self.driver: DriverInfo = DriverInfo(None, None, None)
        self.inventory: list[GpuInfo] = []
        self.monitor: Monitor | None = None
        self.supervisor: Supervisor | None = None
        self._threads: list[threading.Thread] = []
        # held around every NVML use that a reset must not overlap
        self._poll_lock = threading.Lock()
        self._events_lock = threading.Lock()
        self.hooks = NodeHooks(config.hooks, self.record)
        self._xid_counts: collections.Counter[tuple[str, int]] = collections.Counter()
        self._node_bad: frozenset[str] | None = None
        self.metrics_server: MetricsServer | None = None
        # the store is the memory; this copy keeps the hot path free of SQL
        self.excluded: dict[str, QuarantineEntry] = store.excluded()
        self._kernel_log: KernelLogSource | None = None

    # --- lifecycle -----------------------------------------------------
    def start(self) -> None:
        """Open the backend and the sources; the caller then runs `run()`."""
        self.backend.open()
        self.driver = self.backend.driver_info()
        self.inventory = self.backend.inventory()
        self.monitor = Monitor(self.inventory, self.config.health)
        self.supervisor = Supervisor(self)
        self.record(
            Event(
                kind="daemon_started",
                severity=Severity.INFO,
                message=f"gpuguardd {__version__} started: {len(self.inventory)} GPU(s), backend {self.backend.kind}",
                data={"pid": os.getpid(), "driver_version": self.driver.driver_version},
            )
        )
        for info in self.inventory:
            log.info("gpu", gpu_index=info.index, gpu_uuid=info.uuid, pci_bus_id=info.pci_bus_id, name=info.name)
        self._kernel_log = KernelLogSource(self.kernel_log_path)
        self.poll()  # jobs are placed on GPUs whose health is known
        with self.lock:
            self.monitor.evaluate(time.time())
            self.supervisor.start()
        self._spawn("kmsg", self._kernel_log_loop)
        if self.config.metrics.enabled:
            try:
                self.metrics_server = start_metrics_server(self.config.metrics, self)
            except OSError as exc:
                log.error("metrics_unavailable", address=self.config.metrics.address, port=self.config.metrics.port, error=str(exc))
        if self.config.monitor.nvml_events:
            self._spawn("nvml-events", self._nvml_event_loop)

    def _spawn(self, name: str, target: Any) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self.stopping.set()
        self.queue.put(None)

    def close(self) -> None:
        """After run() returned: release sources, the backend and the store."""
        sdnotify.notify("STOPPING=1")
        self.record(Event(kind="daemon_stopped", severity=Severity.INFO, message="gpuguardd stopped"))
        if self._kernel_log is not None:
            self._kernel_log.close()
        if self.supervisor is not None:
            self.supervisor.close()  # jobs keep running; a new daemon re-adopts them
        try:
            self.backend.close()
        except Exception as exc:  # stopping must finish even if NVML misbehaves
            log.warning("backend_close_failed", error=str(exc))
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.hooks.wait_idle(5.0)
        self.store.close()

    # --- sources (their own threads) ----------------------------------
    def _kernel_log_loop(self) -> None:
        assert self._kernel_log is not None
        while not self.stopping.is_set():
            try:
                items = self._kernel_log.read(0.2)
            except Exception as exc:  # keep reading; a bad record must not end detection
                log.error("kernel_log_read_failed", error=str(exc), path=str(self.kernel_log_path))
                self.stopping.wait(1.0)
                continue
            for item in items:
                if isinstance(item, XidObservation):
                    self.queue.put(item)
                elif isinstance(item, PciMapping):
                    log.debug("kernel_log_gpu_mapping", pci_bus_id=item.pci_bus_id, gpu_uuid=item.uuid)

    def _nvml_event_loop(self) -> None:
        while not self.stopping.is_set():
            if self.resetting:
                self.stopping.wait(EVENT_WAIT_S)
                continue
            try:
                with self._events_lock:
                    events = [] if self.resetting else self.backend.wait_events(EVENT_WAIT_S)
            except Exception as exc:
                log.warning("nvml_events_failed", error=str(exc))
                self.stopping.wait(5.0)
                continue
            for ev in events:
                self.queue.put(ev)

    # --- the main loop -------------------------------------------------
    def run(self) -> None:
        interval = self.config.monitor.poll_interval_s
        watchdog = sdnotify.watchdog_interval_s()
        next_poll = time.monotonic()
        last_prune = 0.0
        ready = False
        while not self.stopping.is_set():
            wait = max(0.0, next_poll - time.monotonic())
            poll_now = self._drain(wait)
            if self.stopping.is_set():
                break
            now_mono = time.monotonic()
            if poll_now or now_mono >= next_poll:
                self.poll()
                next_poll = max(next_poll + interval, now_mono + (0 if poll_now else interval * 0.5))
            with self.lock:
                assert self.monitor is not None and self.supervisor is not None
                now = time.time()
                for event in self.monitor.evaluate(now):
                    self.record(event)
                self.supervisor.tick(now)
                self._node_hooks()
            if not ready and self.last_poll_at is not None:
                ready = True
                sdnotify.notify("READY=1\nSTATUS=" + self.summary())
            elif ready:
                sdnotify.notify("STATUS=" + self.summary())
            if watchdog is not None:
                sdnotify.notify("WATCHDOG=1")
            if now_mono - last_prune >= PRUNE_EVERY_S:
                last_prune = now_mono
                self.store.prune(self.config.daemon.event_retention_days * 86400, self.config.daemon.event_retention_max_rows)

    def _drain(self, wait_s: float) -> bool:
        """Handle queued observations, waiting up to wait_s for the first.
        True when someone asked for an immediate poll."""
        poll_now = False
        try:
            item = self.queue.get(timeout=wait_s) if wait_s > 0 else self.queue.get_nowait()
        except queue.Empty:
            return False
        while True:
            if isinstance(item, _PollNow):
                poll_now = True
            elif isinstance(item, _Reload):
                self.reload()
            elif isinstance(item, XidObservation):
                self._observe_xid(item)
            elif isinstance(item, NvmlEvent):
                self._observe_nvml_event(item)
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return poll_now

    def _observe_xid(self, obs: XidObservation) -> None:
        with self.lock:
            assert self.monitor is not None
            event = self.monitor.observe_xid(obs)
        if event is not None:
            self.record(event)

    def _observe_nvml_event(self, ev: NvmlEvent) -> None:
        if ev.event_type == "xid":
            self._observe_xid(XidObservation(xid=ev.data, timestamp=ev.timestamp, source="nvml", uuid=ev.uuid))
        else:
            # ECC and the like also show in the next poll's counters: poll now
            log.info("nvml_event", gpu_uuid=ev.uuid, type=ev.event_type, data=ev.data)
            self.queue.put(_PollNow())

    def poll(self) -> None:
        with self._poll_lock:
            if self.resetting:
                return  # NVML is closed around a reset
            snapshots = self.backend.poll()
        with self.lock:
            assert self.monitor is not None
            self.monitor.observe_snapshots(snapshots)
            self.last_poll_at = time.time()

    def request_poll(self) -> None:
        self.queue.put(_PollNow())

    def wake(self) -> None:
        self.queue.put(_Wake())

    def request_reload(self) -> None:
        """From the SIGHUP handler: only queue it, the main loop does the work."""
        self.queue.put(_Reload())

    def reload(self) -> None:
        """Apply a new config's live keys; log the keys that need a restart."""
        if self._reload_config is None:
            return
        try:
            new = self._reload_config()
        except Exception as exc:  # a bad edit must not stop a running daemon
            log.error("config_reload_failed", error=str(exc))
            return
        old = self.config
        ignored = [
            key
            for key in RESTART_KEYS
            if getattr(getattr(old, key.split(".")[0]), key.split(".")[1])
            != getattr(getattr(new, key.split(".")[0]), key.split(".")[1])
        ]
        monitor_cfg = replace(
            new.monitor,
            kernel_log=old.monitor.kernel_log,
            nvml_timeout_s=old.monitor.nvml_timeout_s,
            nvml_events=old.monitor.nvml_events,
        )
        if new.job != old.job:
            ignored.append("[[job]]")  # config jobs are started once, at start-up
        jobs_cfg = replace(
            new.jobs,
            checkpoint_signal=old.jobs.checkpoint_signal,
            snapshots_keep=old.jobs.snapshots_keep,
            snapshots_max_bytes=old.jobs.snapshots_max_bytes,
        )
        with self.lock:
            self.config = replace(new, daemon=old.daemon, monitor=monitor_cfg, jobs=jobs_cfg, job=old.job)
            if self.monitor is not None:
                self.monitor.config = new.health
            self.hooks.config = new.hooks
        logging.getLogger().setLevel(new.daemon.log_level.upper())
        log.info("config_reloaded", source=str(new.source), needs_restart=ignored or None)

    # --- actions -------------------------------------------------------
    def reset_gpu(self, uuid: str, by: str) -> ResetResult:
        """Reset one GPU now, if nothing holds it; records a gpu_reset event."""
        assert self.monitor is not None
        info = self.monitor.tracks[uuid].info
        with self.lock:
            if uuid in self.resetting:
                return ResetResult(False, "a reset of this GPU is already in progress")
            snap = self.monitor.tracks[uuid].snapshot
            holders = sorted(p.pid for p in (snap.processes if snap else ()) if p.pid != os.getpid())
            if holders:
                return ResetResult(False, f"refused: processes still hold the GPU (pids {', '.join(map(str, holders))})")
            self.resetting.add(uuid)
        try:
            result = self._reset(info)
        finally:
            with self.lock:
                self.resetting.discard(uuid)
        if result.ok:
            with self.lock:
                self.monitor.clear_xids(uuid, {Action.RESET_GPU})
        self.record(
            Event(
                kind="gpu_reset",
                severity=Severity.INFO if result.ok else Severity.ERROR,
                message=f"GPU {info.index} reset {'succeeded' if result.ok else 'failed'}: {result.detail}",
                gpu=uuid,
                data={"ok": result.ok, "by": by, "argv": list(result.argv), "pci_bus_id": info.pci_bus_id},
            )
        )
        self.request_poll()
        return result

    def _reset(self, info: GpuInfo) -> ResetResult:
        from gpuguard.sim.backend import SimulatedBackend

        with self._poll_lock, self._events_lock:
            argv = reset_argv(self.config.reset.command, info)
            if isinstance(self.backend, SimulatedBackend):
                # a reset command set in the config runs first (tests record it);
                # the simulated hardware resets only if it succeeds
                if self.config.reset.command != ResetConfig().command:
                    result = run_reset_command(argv, self.config.reset.timeout_s)
                    if not result.ok:
                        return result
                ok, detail = self.backend.reset(info.index)
                return ResetResult(ok, detail, tuple(argv))
            self.backend.close()
            try:
                return run_reset_command(argv, self.config.reset.timeout_s)
            finally:
                self.backend.open()

    def exclude_gpu(self, uuid: str, reason: str, by: str) -> None:
        """Quarantine a GPU (persists across restarts) and say so."""
        assert self.monitor is not None
        info = self.monitor.tracks[uuid].info
        self.store.exclude(uuid, reason, by=by)
        self.excluded = self.store.excluded()
        self.record(
            Event(
                kind="gpu_excluded",
                severity=Severity.WARNING,
                message=f"GPU {info.index} excluded by {by}: {reason}",
                gpu=uuid,
                data={"by": by, "pci_bus_id": info.pci_bus_id},
            )
        )

    def include_gpu(self, uuid: str, by: str, why: str = "") -> bool:
        """Return a GPU to service; False when it was not excluded."""
        assert self.monitor is not None
        info = self.monitor.tracks[uuid].info
        changed = self.store.include(uuid)
        self.excluded = self.store.excluded()
        if changed:
            self.record(
                Event(
                    kind="gpu_included",
                    severity=Severity.INFO,
                    message=f"GPU {info.index} returned to service by {by}" + (f": {why}" if why else ""),
                    gpu=uuid,
                    data={"by": by, "pci_bus_id": info.pci_bus_id},
                )
            )
        return changed

    def resets_today(self, uuid: str) -> int:
        since = time.time() - 86400
        return sum(1 for e in self.store.events(limit=None, gpu=uuid, kinds=["gpu_reset"]) if e.ts >= since and e.data.get("ok"))

    def schedule_reset(self, uuid: str, by: str) -> None:
        """After a job left a GPU of the reset class: reset it, then probation."""
        if self.resets_today(uuid) >= self.config.reset.max_per_gpu_per_day:
            self.record(
                Event(
                    kind="gpu_reset",
                    severity=Severity.ERROR,
                    gpu=uuid,
                    message=f"no reset of this GPU: {self.config.reset.max_per_gpu_per_day} reset(s) in the last 24 h already; it stays excluded",
                    data={"ok": False, "by": by, "skipped": True},
                )
            )
            return

        def run() -> None:
            asked = time.time()
            self.request_poll()  # the process list must be fresh: the job just left
            deadline = time.monotonic() + 3 * self.config.monitor.poll_interval_s + self.config.monitor.nvml_timeout_s
            while (self.last_poll_at or 0) <= asked and time.monotonic() < deadline and not self.stopping.is_set():
                time.sleep(0.02)
            result = self.reset_gpu(uuid, by=by)
            if result.ok and self.supervisor is not None:
                with self.lock:
                    self.supervisor.start_probation(uuid)

        threading.Thread(target=run, name=f"reset-{uuid[:12]}", daemon=True).start()

    def xid_counts(self) -> dict[tuple[str, int], int]:
        """Xids seen per (GPU, code) since the daemon started, for the metrics."""
        with self.lock:
            return dict(self._xid_counts)

    def _node_hooks(self) -> None:
        """Run the node hooks when the set of unfit GPUs changes."""
        from gpuguard.daemon.control import UNHEALTHY_STATES

        assert self.monitor is not None
        states = {uuid: self.gpu_state(uuid) for uuid in self.monitor.tracks}
        uuids = frozenset(u for u, (state, _) in states.items() if state in UNHEALTHY_STATES)
        if uuids == self._node_bad:
            return
        previous, self._node_bad = self._node_bad, uuids
        gpus = self.gpu_status()
        bad = [g for g in gpus if g["uuid"] in uuids]
        if bad:
            self.hooks.on_unhealthy("; ".join(f"GPU {g['index']} {g['state']}: {g['reason'] or g['state']}" for g in bad), bad)
        elif previous:
            self.hooks.on_recovered(f"all {len(gpus)} GPU(s) healthy", gpus)

    def node_unhealthy(self, reason: str) -> None:
        """The node itself needs attention (a reboot-class fault)."""
        log.critical("node_unhealthy", reason=reason)

    # --- events --------------------------------------------------------
    def record(self, event: Event) -> Event:
        """Store an event and log it at its severity (faults at err or above)."""
        stored = self.store.append(event)
        if event.kind == "xid" and event.gpu and event.xid is not None:
            with self.lock:
                self._xid_counts[(event.gpu, event.xid)] += 1
        fields: dict[str, Any] = {"kind": event.kind, "gpu_uuid": event.gpu, "job": event.job}
        if event.xid is not None:
            fields["xid"] = event.xid
        for key in ("pci_bus_id", "action"):
            if key in event.data:
                fields[key] = event.data[key]
        if event.gpu and self.monitor is not None and event.gpu in self.monitor.tracks:
            fields["gpu_index"] = self.monitor.tracks[event.gpu].info.index
        level = {Severity.INFO: "info", Severity.WARNING: "warning", Severity.ERROR: "error", Severity.CRITICAL: "critical"}[
            Severity(event.severity)
        ]
        getattr(log, level)(event.message, **{k: v for k, v in fields.items() if v is not None})
        return stored

    # --- views ---------------------------------------------------------
    def gpu_state(self, uuid: str) -> tuple[GpuState, str | None]:
        """The state an operator sees: quarantine and reset over health."""
        assert self.monitor is not None
        if uuid in self.resetting:
            return GpuState.RESETTING, "reset in progress"
        quarantine = self.excluded.get(uuid)
        if quarantine is not None:
            return GpuState.EXCLUDED, quarantine.reason
        verdict = self.monitor.verdict(uuid)
        if verdict is None:
            return GpuState.UNKNOWN, "no sample yet"
        return verdict.state, verdict.reason

    def gpu_status(self) -> list[dict[str, Any]]:
        assert self.monitor is not None
        out = []
        excluded = self.excluded
        with self.lock:
            for uuid, track in self.monitor.tracks.items():
                state, reason = self.gpu_state(uuid)
                verdict = track.verdict
                entry: dict[str, Any] = {
                    "index": track.info.index,
                    "uuid": uuid,
                    "pci_bus_id": track.info.pci_bus_id,
                    "name": track.info.name,
                    "state": state.value,
                    "reason": reason,
                    "jobs": self.supervisor.jobs_on(uuid) if self.supervisor else [],
                    "health": verdict.state.value if verdict else GpuState.UNKNOWN.value,
                    "action": verdict.action.value if verdict else None,
                    "findings": [
                        {"kind": f.kind, "severity": f.severity.value, "action": f.action.value, "message": f.message, "xid": f.xid}
                        for f in (verdict.findings if verdict else ())
                    ],
                    "excluded": uuid in excluded,
                    "serial": track.info.serial,
                }
                entry.update(snapshot_metrics(track.snapshot))
                out.append(entry)
        return out

    def status(self) -> dict[str, Any]:
        return {
            "daemon": {
                "version": __version__,
                "backend": self.backend.kind,
                "uptime_s": round(time.time() - self.started_at, 3),
                "pid": os.getpid(),
                "started_at": self.started_at,
                "last_poll_at": self.last_poll_at,
                "poll_interval_s": self.config.monitor.poll_interval_s,
                "driver_version": self.driver.driver_version,
                "cuda_driver_version": self.driver.cuda_driver_version,
                "nvml_version": self.driver.nvml_version,
                "config": str(self.config.source) if self.config.source else None,
                "state_dir": str(self.config.daemon.state_dir),
                "socket": str(self.config.daemon.socket),
                "kernel_log": str(self.kernel_log_path),
                "store_bytes": self.store.size_bytes(),
            },
            "gpus": self.gpu_status(),
            "jobs": self.supervisor.view() if self.supervisor else [],
        }

    def summary(self) -> str:
        """One line for systemd's STATUS=."""
        assert self.monitor is not None
        counts: dict[str, int] = {}
        for uuid in self.monitor.tracks:
            state, _ = self.gpu_state(uuid)
            counts[state.value] = counts.get(state.value, 0) + 1
        parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        return f"{len(self.monitor.tracks)} GPU(s): {parts or 'none'}"
