"""Per-GPU memory of the daemon: latest snapshot, recent history, active Xids
and the verdict, turned into events when something new is found.

No I/O: the daemon feeds it observations and snapshots, stores the events it
returns, and acts on the verdicts.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from gpuguard.config import HealthConfig
from gpuguard.events import Event, EventKind
from gpuguard.health import xid as xid_catalog
from gpuguard.health.checks.base import ACTION_TEXT
from gpuguard.health.rules import evaluate
from gpuguard.health.types import Action, GpuState, Severity, Verdict
from gpuguard.nvml.types import GpuInfo, GpuSnapshot
from gpuguard.observations import XidObservation, pci_key

HISTORY_S = 600.0  # how far back health rules look (ECC rate, sustained slowdown)
CROSS_SOURCE_DEDUP_S = 10.0  # one Xid seen by NVML events and the kernel log counts once
# the driver prints some faults twice (an Xid 79 line and a "fallen off the
# bus" line); a burst of the same Xid within this window is one fault
SAME_SOURCE_DEDUP_S = 2.0
MAX_XIDS_PER_GPU = 64


@dataclass
class GpuTrack:
    info: GpuInfo
    snapshot: GpuSnapshot | None = None
    history: collections.deque[GpuSnapshot] = field(default_factory=collections.deque)
    xids: list[XidObservation] = field(default_factory=list)
    verdict: Verdict | None = None
    # (kind, xid, action) of the findings already turned into events
    reported: set[tuple[str, int | None, str]] = field(default_factory=set)
    # Xids from before these times were dealt with (by a reset, for its actions; by an
    # operator's include, for all): a late report of one, from the slower of the two
    # sources, is no new fault
    dealt_before: dict[Action, float] = field(default_factory=dict)
    forgotten_before: float | None = None


class Monitor:
    """The health of every GPU of the inventory, from what the sources saw."""

    def __init__(self, inventory: list[GpuInfo], config: HealthConfig) -> None:
        self.config = config
        self.tracks: dict[str, GpuTrack] = {g.uuid: GpuTrack(g) for g in inventory}
        self._by_pci = {pci_key(g.pci_bus_id): g.uuid for g in inventory}

    # --- lookups -------------------------------------------------------
    def resolve(self, gpu: str) -> GpuInfo:
        """A GPU named by index, UUID or PCI bus id; KeyError names what was asked."""
        text = gpu.strip()
        for track in self.tracks.values():
            info = track.info
            if text == str(info.index) or text.lower() == info.uuid.lower():
                return info
        try:
            uuid = self._by_pci.get(pci_key(text))
        except ValueError:
            uuid = None
        if uuid:
            return self.tracks[uuid].info
        raise KeyError(f"no GPU {gpu!r} (give an index 0..{len(self.tracks) - 1} or a UUID)")

    def uuid_for_pci(self, pci: str | None) -> str | None:
        return self._by_pci.get(pci) if pci else None

    # --- inputs --------------------------------------------------------
    def observe_xid(self, obs: XidObservation) -> Event | None:
        """Record one Xid; returns the event to store, or None for a duplicate
        or an Xid of no GPU of ours."""
        uuid = obs.uuid or self.uuid_for_pci(obs.pci_bus_id)
        if uuid is None or uuid not in self.tracks:
            return None
        track = self.tracks[uuid]
        if self._dealt_with(track, obs):
            return None
        for seen in track.xids:
            window = SAME_SOURCE_DEDUP_S if seen.source == obs.source else CROSS_SOURCE_DEDUP_S
            if seen.xid == obs.xid and abs(seen.timestamp - obs.timestamp) <= window:
                return None
        obs = _with_uuid(obs, uuid)
        track.xids.append(obs)
        del track.xids[:-MAX_XIDS_PER_GPU]
        if obs.historical:
            return None  # acts (and is reported) only if the GPU still shows the fault
        info = xid_catalog.lookup(obs.xid)
        recovery = track.snapshot.recovery_action if track.snapshot else None
        action, severity = xid_catalog.resolve(info, recovery)
        track.reported.add(("xid", obs.xid, action.value))
        return Event(
            kind=EventKind.XID,
            severity=severity,
            message=f"Xid {obs.xid} ({info.description}): {ACTION_TEXT[action]}",
            gpu=uuid,
            xid=obs.xid,
            ts=obs.timestamp,
            data={
                "source": obs.source,
                "action": action.value,
                "pci_bus_id": track.info.pci_bus_id,
                "pid": obs.pid,
                "process": obs.process_name,
                "detail": obs.message[:500],
            },
        )

    def observe_snapshots(self, snapshots: list[GpuSnapshot]) -> None:
        for snap in snapshots:
            track = self.tracks.get(snap.uuid)
            if track is None:
                continue
            if track.snapshot is not None:
                track.history.append(track.snapshot)
            track.snapshot = snap
            while track.history and snap.timestamp - track.history[0].timestamp > HISTORY_S:
                track.history.popleft()

    def forget(self, uuid: str, now: float) -> None:
        """An operator says the GPU is fine: forget its remembered Xids and what was
        reported, so only what NVML and the kernel report from now on counts."""
        track = self.tracks[uuid]
        track.xids = []
        track.reported = set()
        track.forgotten_before = now

    def clear_xids(self, uuid: str, actions: set[Action], before: float) -> None:
        """Forget active Xids whose action was carried out (e.g. by a reset that began at
        `before`), and ignore any report of one from before then that comes in late."""
        track = self.tracks[uuid]
        track.xids = [x for x in track.xids if self._xid_action(track, x) not in actions]
        for action in actions:
            track.dealt_before[action] = before
        # Xids that stay active were reported already: only the cleared ones may be news again
        cleared = {action.value for action in actions}
        track.reported = {key for key in track.reported if key[0] != "xid" or key[2] not in cleared}

    def _dealt_with(self, track: GpuTrack, obs: XidObservation) -> bool:
        if track.forgotten_before is not None and obs.timestamp < track.forgotten_before:
            return True
        before = track.dealt_before.get(self._xid_action(track, obs))
        return before is not None and obs.timestamp < before

    @staticmethod
    def _xid_action(track: GpuTrack, obs: XidObservation) -> Action:
        recovery = track.snapshot.recovery_action if track.snapshot else None
        return xid_catalog.action_of(obs.xid, recovery)

    # --- verdicts ------------------------------------------------------
    def evaluate(self, now: float) -> list[Event]:
        """New verdicts for every GPU; events for findings that are new and
        for GPUs that came back to healthy."""
        events: list[Event] = []
        for uuid, track in self.tracks.items():
            self._expire_xids(track, now)
            verdict = evaluate(
                uuid,
                track.snapshot,
                history=list(track.history),
                xids=track.xids,
                config=self.config,
                now=now,
            )
            previous, track.verdict = track.verdict, verdict
            current: set[tuple[str, int | None, str]] = set()
            for finding in verdict.findings:
                if finding.severity == Severity.INFO:
                    continue
                key = (finding.kind, finding.xid, finding.action.value)
                current.add(key)
                if key not in track.reported:
                    events.append(
                        Event(
                            kind=finding.kind,
                            severity=finding.severity,
                            message=finding.message,
                            gpu=uuid,
                            xid=finding.xid,
                            ts=now,
                            data={"action": finding.action.value, "pci_bus_id": track.info.pci_bus_id},
                        )
                    )
            track.reported = current
            if (
                previous is not None
                and previous.state != GpuState.HEALTHY
                and verdict.state == GpuState.HEALTHY
            ):
                events.append(
                    Event(
                        kind=EventKind.GPU_RECOVERED,
                        severity=Severity.INFO,
                        message=f"GPU {track.info.index} is healthy again (was {previous.state}: {previous.reason})",
                        gpu=uuid,
                        ts=now,
                    )
                )
        return events

    def _expire_xids(self, track: GpuTrack, now: float) -> None:
        """Drop restart-the-app and no-action Xids once their window is over."""
        window = self.config.restart_app_window_s
        track.xids = [
            x
            for x in track.xids
            if self._xid_action(track, x) not in (Action.RESTART_APP, Action.NONE)
            or now - x.timestamp <= window
        ]

    def verdict(self, uuid: str) -> Verdict | None:
        return self.tracks[uuid].verdict


def _with_uuid(obs: XidObservation, uuid: str) -> XidObservation:
    from dataclasses import replace

    return replace(obs, uuid=uuid)


def snapshot_metrics(snap: GpuSnapshot | None) -> dict[str, Any]:
    """The metrics of a snapshot as JSON-able fields for `status`."""
    if snap is None:
        return {"sampled_at": None}
    out: dict[str, Any] = {"sampled_at": snap.timestamp}
    for name in (
        "gpu_util_pct",
        "mem_util_pct",
        "memory_used_bytes",
        "memory_total_bytes",
        "temperature_c",
        "power_w",
        "power_limit_w",
        "sm_clock_mhz",
        "hw_slowdown",
        "thermal_slowdown",
        "power_brake",
        "ecc_enabled",
        "ecc_volatile_corrected",
        "ecc_volatile_uncorrected",
        "ecc_aggregate_corrected",
        "ecc_aggregate_uncorrected",
        "retired_pages_sbe",
        "retired_pages_dbe",
        "retired_pages_pending",
        "remap_correctable",
        "remap_uncorrectable",
        "remap_pending",
        "remap_failure",
        "pcie_replay_counter",
        "nvlink_crc_errors",
        "nvlink_replay_errors",
        "nvlink_recovery_errors",
        "recovery_action",
    ):
        out[name] = getattr(snap, name)
    out["processes"] = [{"pid": p.pid, "used_memory_bytes": p.used_memory_bytes} for p in snap.processes]
    out["nvml_findings"] = [{"kind": f.kind.value, "call": f.call, "detail": f.detail} for f in snap.findings]
    return out
