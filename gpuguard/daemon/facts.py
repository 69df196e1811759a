"""What the daemon hands the supervisor: the facts of every GPU, built once
per tick, and the live settings, built from the config."""

from __future__ import annotations

from gpuguard.config import Config
from gpuguard.daemon.gpus import Pool
from gpuguard.health import xid
from gpuguard.health.types import Action
from gpuguard.supervisor.ports import GpuFacts, Settings


def gpu_facts(pool: Pool) -> dict[str, GpuFacts]:
    """Every GPU of the inventory, in index order. The caller holds the daemon's lock."""
    out: dict[str, GpuFacts] = {}
    tracks = sorted(pool.monitor.tracks.items(), key=lambda kv: kv[1].info.index)
    for uuid, track in tracks:
        state, reason = pool.state(uuid)
        verdict, snap = track.verdict, track.snapshot
        recovery = snap.recovery_action if snap else None
        app_xids = tuple(
            (x.xid, x.timestamp) for x in track.xids if not x.historical and xid.action_of(x.xid, recovery) == Action.RESTART_APP
        )
        entry = pool.excluded.get(uuid)
        out[uuid] = GpuFacts(
            uuid,
            state,
            verdict.action if verdict else Action.NONE,
            reason,
            app_xids,
            index=track.info.index,
            util_pct=snap.gpu_util_pct if snap else None,
            holders=tuple(p.pid for p in snap.processes) if snap else (),
            excluded_by=entry.by if entry else None,
            health=verdict.state if verdict else None,
            suspect=uuid in pool.suspicion.suspects,
        )
    return out


def settings_of(config: Config) -> Settings:
    jobs, monitor = config.jobs, config.monitor
    return Settings(
        checkpoint_signal=jobs.checkpoint_signal,
        checkpoint_grace_s=jobs.checkpoint_grace_s,
        stop_timeout_s=jobs.stop_timeout_s,
        max_restarts=jobs.max_restarts,
        backoff_initial_s=jobs.backoff_initial_s,
        backoff_max_s=jobs.backoff_max_s,
        stable_after_s=jobs.stable_after_s,
        migrate_on_degraded=jobs.migrate_on_degraded,
        foreign_never_signal=tuple(jobs.foreign_never_signal),
        hang_timeout_s=monitor.hang_timeout_s,
        hang_startup_timeout_s=monitor.hang_startup_timeout_s,
        hang_idle_util_pct=monitor.hang_idle_util_pct,
        standby_min_free_mb=jobs.standby_min_free_mb,
        standby_delay_s=jobs.standby_delay_s,
    )
