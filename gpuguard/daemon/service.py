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
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import structlog

from gpuguard import __version__, sdnotify
from gpuguard.actions.hooks import NodeHooks
from gpuguard.actions.slurm import SlurmCommands
from gpuguard.config import Config
from gpuguard.daemon.facts import gpu_facts, settings_of
from gpuguard.daemon.gpus import Pool
from gpuguard.daemon.monitor import Monitor
from gpuguard.daemon.reload import merge_reload
from gpuguard.events import Event, EventKind
from gpuguard.health.types import Severity
from gpuguard.kmsg.parser import PciMapping
from gpuguard.kmsg.reader import KernelLogSource
from gpuguard.nvml.backend import Backend
from gpuguard.nvml.types import DriverInfo, GpuInfo, NvmlEvent
from gpuguard.observations import XidObservation
from gpuguard.metrics import MetricsServer, start_metrics_server
from gpuguard.storage.build import open_storage
from gpuguard.storage.uploader import Uploader
from gpuguard.store import EventStore
from gpuguard.supervisor.files import JobFiles
from gpuguard.supervisor.ports import Facts, NoStorage, Ports, SnapshotStore
from gpuguard.supervisor.snapshots import SnapshotRing
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
        self.driver: DriverInfo = DriverInfo(None, None, None)
        self.inventory: list[GpuInfo] = []
        self.monitor: Monitor | None = None
        self.pool: Pool | None = None
        self.supervisor: Supervisor | None = None
        self._threads: list[threading.Thread] = []
        self.hooks = NodeHooks(config.hooks, self.record)
        self._xid_counts: collections.Counter[tuple[str, int]] = collections.Counter()
        self.metrics_server: MetricsServer | None = None
        self._kernel_log: KernelLogSource | None = None
        self.storage: SnapshotStore = NoStorage()  # [storage] url, opened by start()

    # --- lifecycle -----------------------------------------------------
    def start(self) -> None:
        """Open the backend and the sources; the caller then runs `run()`."""
        self.storage = open_storage(self.config, self.record)  # first: a ConfigError (exit 2) before anything runs
        self.backend.open()
        self.driver = self.backend.driver_info()
        self.inventory = self.backend.inventory()
        self.monitor = Monitor(self.inventory, self.config.health)
        self.pool = Pool(
            backend=self.backend,
            monitor=self.monitor,
            store=self.store,
            config=lambda: self.config,
            record=self.record,
            hooks=self.hooks,
            lock=self.lock,
            request_poll=self.request_poll,
            last_poll_at=lambda: self.last_poll_at,
            stopping=self.stopping,
        )
        self.supervisor = self._make_supervisor(self.pool)
        self.record(
            Event(
                kind=EventKind.DAEMON_STARTED,
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
            self.supervisor.start(self.config.job, self.facts())
        self._spawn("kmsg", self._kernel_log_loop)
        if self.config.metrics.enabled:
            try:
                self.metrics_server = start_metrics_server(self.config.metrics, self)
            except OSError as exc:
                log.error("metrics_unavailable", address=self.config.metrics.address, port=self.config.metrics.port, error=str(exc))
        if self.config.monitor.nvml_events:
            self._spawn("nvml-events", self._nvml_event_loop)

    def _make_supervisor(self, pool: Pool) -> Supervisor:
        daemon = self.config.daemon
        ports = Ports(
            pool=pool,
            record=self.record,
            records=self.store,
            wake=self.wake,
            settings=lambda: settings_of(self.config),
            facts=self.facts,
            scheduler=SlurmCommands(lambda: self.config.slurm),
            storage=self.storage,
        )
        ring = SnapshotRing(
            daemon.state_dir / "snapshots", keep_newest=self.config.jobs.snapshots_keep, max_bytes=self.config.jobs.snapshots_max_bytes
        )
        for path in (daemon.state_dir, ring.root):
            path.chmod(0o711)  # jobs must reach their snapshot and runtime files, not list them
        return Supervisor(ports, JobFiles(daemon.state_dir / "jobs", daemon.socket.parent / "jobs"), ring)

    def facts(self) -> Facts:
        """Every GPU as the supervisor sees it now."""
        assert self.pool is not None
        with self.lock:
            return gpu_facts(self.pool)

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
        self.record(Event(kind=EventKind.DAEMON_STOPPED, severity=Severity.INFO, message="gpuguardd stopped"))
        if self._kernel_log is not None:
            self._kernel_log.close()
        if self.supervisor is not None:
            self.supervisor.close()  # jobs keep running; a new daemon re-adopts them
        if isinstance(self.storage, Uploader):
            self.storage.close()  # an upload under way is cut off; the next daemon's start does it again
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
        assert self.pool is not None
        pool = self.pool
        while not self.stopping.is_set():
            if pool.resetting:
                self.stopping.wait(EVENT_WAIT_S)
                continue
            try:
                with pool.events_lock:
                    events = [] if pool.resetting else self.backend.wait_events(EVENT_WAIT_S)
            except Exception as exc:
                log.warning("nvml_events_failed", error=str(exc))
                self.stopping.wait(5.0)
                continue
            for ev in events:
                self.queue.put(ev)

    # --- the main loop -------------------------------------------------
    def run(self) -> None:
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
                interval = self.config.monitor.poll_interval_s  # live: a SIGHUP reload changes it
                self.poll()
                next_poll = max(next_poll + interval, now_mono + (0 if poll_now else interval * 0.5))
            with self.lock:
                assert self.monitor is not None and self.supervisor is not None and self.pool is not None
                now = time.time()
                for event in self.monitor.evaluate(now):
                    self.record(event)
                self.supervisor.tick(now, gpu_facts(self.pool))
                try:
                    self.pool.tick(now, self.supervisor.jobs_on)
                except Exception:  # a bug in one of the pool's rules must not end detection
                    log.exception("pool_tick_failed")
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
        assert self.pool is not None
        with self.pool.poll_lock:
            if self.pool.resetting:
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
        """Apply a new config's live keys; log the keys that need a restart.
        systemd hears RELOADING=1 first and READY=1 once done, even when the new
        config was refused (the daemon runs on with the old one)."""
        sdnotify.reloading()
        try:
            new = self._reload_config() if self._reload_config is not None else None
        except Exception as exc:  # a bad edit must not stop a running daemon
            log.error("config_reload_failed", error=str(exc))
            new = None
        if new is not None:
            merged, ignored = merge_reload(self.config, new)
            with self.lock:
                self.config = merged
                if self.monitor is not None:
                    self.monitor.config = new.health
                self.hooks.config = new.hooks
            logging.getLogger().setLevel(new.daemon.log_level.upper())
            log.info("config_reloaded", source=str(new.source), needs_restart=ignored or None)
        sdnotify.notify("READY=1")

    def xid_counts(self) -> dict[tuple[str, int], int]:
        """Xids seen per (GPU, code) since the daemon started, for the metrics."""
        with self.lock:
            return dict(self._xid_counts)

    # --- events --------------------------------------------------------
    def record(self, event: Event) -> Event:
        """Store an event and log it at its severity (faults at err or above)."""
        stored = self.store.append(event)
        if event.kind == EventKind.XID and event.gpu and event.xid is not None:
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
    def gpu_status(self) -> list[dict[str, Any]]:
        assert self.pool is not None
        supervisor = self.supervisor
        return self.pool.status(supervisor.jobs_on if supervisor else lambda _uuid: [])

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
                "storage": self.storage.describe() if isinstance(self.storage, Uploader) else None,
            },
            "gpus": self.gpu_status(),
            "jobs": self.supervisor.view() if self.supervisor else [],
        }

    def summary(self) -> str:
        """One line for systemd's STATUS=."""
        assert self.monitor is not None and self.pool is not None
        counts: dict[str, int] = {}
        for uuid in self.monitor.tracks:
            state, _ = self.pool.state(uuid)
            counts[state.value] = counts.get(state.value, 0) + 1
        parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        return f"{len(self.monitor.tracks)} GPU(s): {parts or 'none'}"
