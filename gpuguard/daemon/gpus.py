"""The GPU pool: which GPUs may take work, and the actions on them.

Owns what an operator sees as a GPU's state beyond its health: exclusion
(persisted), resets (with the daily cap), probation after a reset, the rule
that turns repeated hangs into suspicion, and the node hooks. The supervisor
reaches it only through the `GpuPool` port; the control socket through the
daemon's controller.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from gpuguard.actions.hooks import NodeHooks
from gpuguard.actions.reset import ResetResult, reset_argv, run_reset_command
from gpuguard.config import Config, ResetConfig
from gpuguard.daemon.monitor import Monitor, snapshot_metrics
from gpuguard.daemon.suspicion import Suspicion
from gpuguard.events import Event, EventKind
from gpuguard.health.checks import nvml as nvml_check
from gpuguard.health.types import UNHEALTHY_STATES, Action, GpuState, Severity
from gpuguard.nvml.backend import Backend
from gpuguard.nvml.types import GpuInfo
from gpuguard.store import EventStore, QuarantineEntry, StoreError

log = structlog.get_logger("gpuguard.daemon")

BY_GPUGUARD = "gpuguard"

JobsOn = Callable[[str], list[str]]


class Pool:
    """The `GpuPool` port of the supervisor, and the GPU side of the control commands."""

    def __init__(
        self,
        *,
        backend: Backend,
        monitor: Monitor,
        store: EventStore,
        config: Callable[[], Config],
        record: Callable[[Event], Event],
        hooks: NodeHooks,
        lock: threading.RLock,
        request_poll: Callable[[], None],
        last_poll_at: Callable[[], float | None],
        stopping: threading.Event,
    ) -> None:
        self.backend = backend
        self.monitor = monitor
        self.store = store
        self._config = config
        self._record = record
        self.hooks = hooks
        self.lock = lock  # the daemon's: guards the monitor and this pool's maps
        self._request_poll = request_poll
        self._last_poll_at = last_poll_at
        self._stopping = stopping
        # held around every NVML use that a reset must not overlap
        self.poll_lock = threading.Lock()
        self.events_lock = threading.Lock()
        self.resetting: set[str] = set()
        # the store is the memory; this copy keeps the hot path free of SQL
        self.excluded: dict[str, QuarantineEntry] = store.excluded()
        self._unsaved: dict[str, QuarantineEntry | None] = {}  # quarantine changes the store has not taken yet
        self._save_lock = threading.Lock()  # a leaf: nothing else is taken under it but the store's own
        self.suspicion = Suspicion(record, lambda uuid: self.info(uuid).index)
        self.probation: dict[str, float] = {}  # GPU uuid -> when it may return to the pool
        self._node_bad: frozenset[str] | None = None

    def info(self, uuid: str) -> GpuInfo:
        return self.monitor.tracks[uuid].info

    # --- state ---------------------------------------------------------
    def state(self, uuid: str) -> tuple[GpuState, str | None]:
        """The state an operator sees: quarantine and reset over health."""
        if uuid in self.resetting:
            return GpuState.RESETTING, "reset in progress"
        quarantine = self.excluded.get(uuid)
        if quarantine is not None:
            return GpuState.EXCLUDED, quarantine.reason
        verdict = self.monitor.verdict(uuid)
        if verdict is None:
            return GpuState.UNKNOWN, "no sample yet"
        return verdict.state, verdict.reason

    # --- exclusion -----------------------------------------------------
    def exclude(self, uuid: str, reason: str, by: str = BY_GPUGUARD) -> None:
        """Quarantine a GPU (persists across restarts) and say so. gpuguard's own
        exclusion of a GPU already out of the pool changes nothing."""
        if by == BY_GPUGUARD and uuid in self.excluded:
            return
        info = self.info(uuid)
        self._quarantine(uuid, QuarantineEntry(uuid, reason, by, time.time()))
        self._record(
            Event(
                kind=EventKind.GPU_EXCLUDED, severity=Severity.WARNING, gpu=uuid,
                message=f"GPU {info.index} excluded by {by}: {reason}", data={"by": by, "pci_bus_id": info.pci_bus_id},
            )
        )

    def include(self, uuid: str, by: str, why: str = "") -> bool:
        """Return a GPU to service; False when it was not excluded. An operator's
        include is the operator's word (gpud's set-healthy): it also forgets the
        GPU's remembered Xids, hang suspicion and probation, so only what is
        reported from now on can fault it again."""
        info = self.info(uuid)
        changed = self._quarantine(uuid, None)
        if by != BY_GPUGUARD:
            with self.lock:
                forgotten = bool(self.monitor.tracks[uuid].xids) or uuid in self.suspicion.suspects or uuid in self.probation
                self.monitor.forget(uuid, time.time())
                self.suspicion.forget(uuid)
                self.probation.pop(uuid, None)
            changed = changed or forgotten
            self._request_poll()  # the verdict follows at the next evaluation
        if changed:
            self._record(
                Event(
                    kind=EventKind.GPU_INCLUDED, severity=Severity.INFO, gpu=uuid,
                    message=f"GPU {info.index} returned to service by {by}" + (f": {why}" if why else ""),
                    data={"by": by, "pci_bus_id": info.pci_bus_id},
                )
            )
        return changed

    def _quarantine(self, uuid: str, entry: QuarantineEntry | None) -> bool:
        """Exclude (entry) or include (None) a GPU: in memory at once, so the decision
        holds even when the store cannot save it (a full disk); saving is retried each
        tick until it succeeds. True when the GPU's quarantine changed."""
        with self._save_lock:  # the control socket's threads and the main loop both come here
            changed = (uuid in self.excluded) if entry is None else True
            excluded = dict(self.excluded)
            if entry is None:
                excluded.pop(uuid, None)
            else:
                excluded[uuid] = entry
            self.excluded = excluded
            self._unsaved[uuid] = entry
            self._save_quarantine()
        return changed

    def _save_quarantine(self) -> None:
        """Hand the store what it has not taken yet; the caller holds _save_lock."""
        for uuid, entry in list(self._unsaved.items()):
            try:
                if entry is None:
                    self.store.include(uuid)
                else:
                    self.store.exclude(uuid, entry.reason, by=entry.by, ts=entry.ts)
            except StoreError as exc:
                log.error("quarantine_not_saved", gpu_uuid=uuid, error=str(exc), detail="kept in memory; retried each tick")
                return
            if self._unsaved.get(uuid) is entry:
                del self._unsaved[uuid]

    def job_hung(self, job: str, uuids: Sequence[str]) -> None:
        """A hang alone is no GPU-side evidence: it makes the GPUs suspect (suspicion.py)."""
        self.suspicion.hung(job, uuids)

    def node_unhealthy(self, reason: str) -> None:
        """The node itself needs attention (a reboot-class fault)."""
        log.critical("node_unhealthy", reason=reason)

    def refresh(self) -> None:
        self._request_poll()

    # --- simulated holders ---------------------------------------------
    def occupied(self, uuid: str, pid: int) -> None:
        if self.backend.simulator is not None:
            self.backend.simulator.attach(uuid, pid)

    def vacated(self, uuid: str, pid: int) -> None:
        if self.backend.simulator is not None:
            try:
                self.backend.simulator.detach(uuid, pid)
            except ValueError:  # it was never shown there
                pass

    # --- resets --------------------------------------------------------
    _one_reset = threading.Lock()  # NVML is one per process: one reset at a time closes it

    def reset(self, uuid: str, by: str) -> ResetResult:
        """Reset one GPU now, if nothing holds it; records a gpu_reset event.
        While it runs the GPU shows `resetting` and the main loop skips NVML
        polls but keeps ticking; a second reset of the GPU is refused."""
        info = self.info(uuid)
        with self.lock:
            if uuid in self.resetting:
                return ResetResult(False, "a reset of this GPU is already in progress")
            snap = self.monitor.tracks[uuid].snapshot
            holders = sorted(p.pid for p in (snap.processes if snap else ()) if p.pid != os.getpid())
            if holders:
                return ResetResult(False, f"refused: processes still hold the GPU (pids {', '.join(map(str, holders))})")
            self.resetting.add(uuid)
        started = time.time()
        try:
            result = self._run_reset(info)
        finally:
            with self.lock:
                self.resetting.discard(uuid)
        if result.ok:
            with self.lock:
                self.monitor.clear_xids(uuid, {Action.RESET_GPU}, before=started)
        self._record(
            Event(
                kind=EventKind.GPU_RESET, severity=Severity.INFO if result.ok else Severity.ERROR, gpu=uuid,
                message=f"GPU {info.index} reset {'succeeded' if result.ok else 'failed'}: {result.detail}",
                data={"ok": result.ok, "by": by, "argv": list(result.argv), "pci_bus_id": info.pci_bus_id},
            )
        )
        self._request_poll()
        return result

    def _run_reset(self, info: GpuInfo) -> ResetResult:
        """Run the reset once NVML is idle, holding nothing the main loop needs."""
        config = self._config().reset
        with self._one_reset:
            self._await_nvml_idle()
            argv = reset_argv(config.command, info)
            sim = self.backend.simulator
            if sim is not None:
                # a reset command set in the config runs first (tests record it);
                # the simulated hardware resets only if it succeeds
                if config.command != ResetConfig().command:
                    result = run_reset_command(argv, config.timeout_s)
                    if not result.ok:
                        return result
                ok, detail = sim.reset(info.index)
                return ResetResult(ok, detail, tuple(argv))
            self.backend.close()
            try:
                return run_reset_command(argv, config.timeout_s)
            finally:
                self.backend.open()

    def _await_nvml_idle(self) -> None:
        """Let a poll or event wait that began before the GPU was marked
        resetting finish; later ones see `resetting` and leave NVML alone."""
        with self.poll_lock, self.events_lock:
            pass

    def resets_today(self, uuid: str) -> int:
        since = time.time() - 86400
        events = self.store.events(limit=None, gpu=uuid, kinds=[EventKind.GPU_RESET])
        return sum(1 for e in events if e.ts >= since and e.data.get("ok"))

    def reset_when_free(self, uuid: str, by: str) -> None:
        """After a job left a GPU of the reset class: reset it, then probation."""
        config = self._config()
        cap = config.reset.max_per_gpu_per_day
        if self.resets_today(uuid) >= cap:
            self._record(
                Event(
                    kind=EventKind.GPU_RESET, severity=Severity.ERROR, gpu=uuid,
                    message=f"no reset of this GPU: {cap} reset(s) in the last 24 h already; it stays excluded",
                    data={"ok": False, "by": by, "skipped": True},
                )
            )
            return

        def run() -> None:
            asked = time.time()
            self._request_poll()  # the process list must be fresh: the job just left
            deadline = time.monotonic() + 3 * config.monitor.poll_interval_s + config.monitor.nvml_timeout_s
            while (self._last_poll_at() or 0) <= asked and time.monotonic() < deadline and not self._stopping.is_set():
                time.sleep(0.02)
            if self.reset(uuid, by=by).ok:
                with self.lock:
                    self.probation[uuid] = time.time() + self._config().reset.probation_s

        threading.Thread(target=run, name=f"reset-{uuid[:12]}", daemon=True).start()

    # --- each tick -----------------------------------------------------
    def tick(self, now: float, jobs_on: JobsOn) -> None:
        """End probations that are over, lift suspicions a stable run disproved, run
        the node hooks when the unfit set changed."""
        if self._unsaved:
            with self._save_lock:
                self._save_quarantine()
        self._wedges(now)
        self._end_probations(now)
        self.suspicion.tick(now, jobs_on, self._config().jobs.stable_after_s)
        self._node_hooks(jobs_on)

    def _wedges(self, now: float) -> None:
        """A GPU whose NVML is wedged leaves the pool (persisted, so a restart keeps it
        out); once NVML answers again and the GPU looks healthy it goes on probation."""
        probation_s = self._config().reset.probation_s
        for uuid, track in self.monitor.tracks.items():
            verdict = track.verdict
            if verdict is None:
                continue
            wedged = next((f for f in verdict.findings if f.kind == EventKind.NVML_WEDGED), None)
            entry = self.excluded.get(uuid)
            if wedged is not None:
                if entry is None:
                    self.exclude(uuid, wedged.message)
                continue
            if (
                entry is not None and entry.by == BY_GPUGUARD and entry.reason.startswith(nvml_check.WEDGED)
                and verdict.state == GpuState.HEALTHY and uuid not in self.probation
            ):  # fmt: skip
                self.probation[uuid] = now + probation_s
                log.info("gpu_probation", gpu_uuid=uuid, why="NVML answers again", probation_s=probation_s)

    def _end_probations(self, now: float) -> None:
        for uuid, until in list(self.probation.items()):
            verdict = self.monitor.verdict(uuid)
            entry = self.excluded.get(uuid)
            if entry is None or entry.by != BY_GPUGUARD:
                del self.probation[uuid]  # an operator took over
                continue
            snap = self.monitor.tracks[uuid].snapshot
            if snap is None or snap.timestamp < until - self._config().reset.probation_s:
                continue  # judged only on a sample taken since probation began, never on one from before the reset
            if verdict is not None and verdict.state != GpuState.HEALTHY:
                del self.probation[uuid]
                self._record(
                    Event(
                        kind=EventKind.GPU_PROBATION_FAILED, severity=Severity.ERROR, gpu=uuid,
                        message=f"GPU {self.info(uuid).index} failed probation ({verdict.reason}); it stays excluded",
                    )
                )
                continue
            if now >= until:
                del self.probation[uuid]
                entry = self.excluded.get(uuid)
                after = "NVML answered again" if entry is not None and entry.reason.startswith(nvml_check.WEDGED) else "its reset"
                self.include(uuid, by=BY_GPUGUARD, why=f"healthy for {self._config().reset.probation_s:g}s after {after}")

    def _node_hooks(self, jobs_on: JobsOn) -> None:
        """Run the node hooks when the set of unfit GPUs changes."""
        uuids = frozenset(u for u in self.monitor.tracks if self.state(u)[0] in UNHEALTHY_STATES)
        if uuids == self._node_bad:
            return
        previous, self._node_bad = self._node_bad, uuids
        gpus = self.status(jobs_on)
        bad = [g for g in gpus if g["uuid"] in uuids]
        if bad:
            self.hooks.on_unhealthy("; ".join(f"GPU {g['index']} {g['state']}: {g['reason'] or g['state']}" for g in bad), bad)
        elif previous:
            self.hooks.on_recovered(f"all {len(gpus)} GPU(s) healthy", gpus)

    # --- views ---------------------------------------------------------
    def status(self, jobs_on: JobsOn) -> list[dict[str, Any]]:
        out = []
        with self.lock:
            for uuid, track in self.monitor.tracks.items():
                state, reason = self.state(uuid)
                verdict = track.verdict
                entry: dict[str, Any] = {
                    "index": track.info.index,
                    "uuid": uuid,
                    "pci_bus_id": track.info.pci_bus_id,
                    "name": track.info.name,
                    "state": state.value,
                    "reason": reason,
                    "jobs": jobs_on(uuid),
                    "health": verdict.state.value if verdict else GpuState.UNKNOWN.value,
                    "action": verdict.action.value if verdict else None,
                    "findings": [
                        {"kind": f.kind, "severity": f.severity.value, "action": f.action.value, "message": f.message, "xid": f.xid}
                        for f in (verdict.findings if verdict else ())
                    ],
                    "excluded": uuid in self.excluded,
                    "suspect": sorted(self.suspicion.suspects.get(uuid, ())),  # jobs that hung on it
                    "serial": track.info.serial,
                }
                entry.update(snapshot_metrics(track.snapshot))
                out.append(entry)
        return out
