"""The daemon's side of the control commands (the `Controller` protocol of
gpuguard.control.commands), on top of `Daemon`."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import psutil

from gpuguard.control.commands import CommandError, PeerCred
from gpuguard.daemon.gpus import Pool
from gpuguard.daemon.service import Daemon
from gpuguard.health.types import UNHEALTHY_STATES, GpuState
from gpuguard.nvml.types import GpuInfo
from gpuguard.supervisor.jobspec import JobError
from gpuguard.supervisor.supervisor import Supervisor


def _who(peer: PeerCred) -> str:
    return f"uid {peer.uid} (pid {peer.pid})"


def _why(gpu: dict[str, Any]) -> str:
    """The reason, plus the other serious findings behind it (at most three)."""
    reasons = [gpu["reason"]] if gpu["reason"] else []
    for finding in gpu["findings"]:
        if finding["severity"] in ("error", "critical") and finding["message"] not in reasons:
            reasons.append(finding["message"])
    return "; ".join(reasons[:3]) or "no reason given"


class DaemonController:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def _gpu(self, gpu: str) -> GpuInfo:
        assert self.daemon.monitor is not None
        try:
            return self.daemon.monitor.resolve(gpu)
        except KeyError as exc:
            raise CommandError(str(exc.args[0]), code="not_found") from None

    # --- reading -------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return self.daemon.status()

    def events(
        self, limit: int, gpu: str | None, job: str | None, *, since_id: int | None = None, since_ts: float | None = None
    ) -> list[dict[str, Any]]:
        """The newest `limit` in store order, then filtered and ordered by
        time: an event's ts is when it was observed, which may precede that
        of an event stored before it."""
        uuid = self._gpu(gpu).uuid if gpu is not None else None
        found = self.daemon.store.events(limit=limit, gpu=uuid, job=job, since_id=since_id)
        if since_ts is not None:
            found = [e for e in found if e.ts >= since_ts]
        found.sort(key=lambda e: (e.ts, math.inf if e.id is None else e.id))  # not yet on disk: last of its time
        return [e.to_json() for e in found]

    def check(self) -> dict[str, Any]:
        gpus = self.daemon.gpu_status()
        if not gpus:
            return {"status": "unknown", "message": "gpuguard: no GPUs found"}
        bad = [g for g in gpus if GpuState(g["state"]) in UNHEALTHY_STATES]
        if not bad:
            return {"status": "healthy", "message": f"gpuguard: all {len(gpus)} GPU(s) healthy"}
        parts = [f"GPU {g['index']} ({g['uuid']}) {g['state']}: {_why(g)}" for g in bad]
        if len(bad) > 1:
            # NPD keeps 512 bytes of it and Slurm's drain reason fewer: which GPUs comes first
            parts.insert(0, f"{len(bad)} of {len(gpus)} GPUs unhealthy ({', '.join(str(g['index']) for g in bad)})")
        return {"status": "unhealthy", "message": "gpuguard: " + "; ".join(parts)}

    def healthy(self) -> list[dict[str, Any]]:
        return [
            {"index": g["index"], "uuid": g["uuid"]}
            for g in self.daemon.gpu_status()
            if g["state"] == GpuState.HEALTHY.value
        ]

    def snapshots(self, name: str) -> list[dict[str, Any]]:
        with _job_errors():
            return self._supervisor().snapshots(name)

    def _supervisor(self) -> Supervisor:
        assert self.daemon.supervisor is not None
        return self.daemon.supervisor

    def _pool(self) -> Pool:
        assert self.daemon.pool is not None
        return self.daemon.pool

    # --- changing ------------------------------------------------------
    def exclude(self, gpu: str, reason: str | None, peer: PeerCred) -> dict[str, Any]:
        info = self._gpu(gpu)
        text = reason or "excluded by operator"
        self._pool().exclude(info.uuid, text, by=_who(peer))
        return {"gpu": info.uuid, "index": info.index, "state": GpuState.EXCLUDED.value, "reason": text}

    def include(self, gpu: str, peer: PeerCred) -> dict[str, Any]:
        info = self._gpu(gpu)
        changed = self._pool().include(info.uuid, by=_who(peer))
        state, reason = self._pool().state(info.uuid)
        return {"gpu": info.uuid, "index": info.index, "changed": changed, "state": state.value, "reason": reason}

    def reset(self, gpu: str, peer: PeerCred) -> dict[str, Any]:
        info = self._gpu(gpu)
        result = self._pool().reset(info.uuid, by=_who(peer))
        if not result.ok:
            raise CommandError(f"GPU {info.index}: {result.detail}", code="failed")
        return {"gpu": info.uuid, "index": info.index, "ok": True, "detail": result.detail}

    def inject(self, gpu: str, fault: str, value: str | None, peer: PeerCred) -> dict[str, Any]:
        sim = self.daemon.backend.simulator
        if sim is None:
            raise CommandError("inject works only on simulated GPUs (gpuguardd --simulate N)", code="refused")
        info = self._gpu(gpu)
        if fault.strip().lower() == "attach" and peer.uid != 0:
            _own_process(value, peer)  # the daemon may signal what is attached: only the caller's own
        try:
            description = sim.inject(info.index, fault, value)
        except ValueError as exc:
            raise CommandError(str(exc), code="bad_request") from None
        self.daemon.request_poll()
        return {"gpu": info.uuid, "index": info.index, "injected": description}

    def run(self, spec: dict[str, Any], peer: PeerCred) -> dict[str, Any]:
        with _job_errors():
            job = self._supervisor().submit(spec, peer.uid, peer.gid, peer.groups)
        a = job.attempt
        return {"name": job.name, "state": job.state.value, "gpus": list(a.gpus), "pid": a.pid, "attempt": a.number}

    def stop(self, name: str, peer: PeerCred) -> dict[str, Any]:
        with _job_errors():
            job = self._supervisor().stop(name, by=_who(peer))
        return {"name": job.name, "state": job.state.value}

    def rollback(self, name: str, snapshot: str | None, peer: PeerCred) -> dict[str, Any]:
        with _job_errors():
            return self._supervisor().rollback(name, snapshot, by=_who(peer))


def _own_process(value: str | None, peer: PeerCred) -> None:
    """Refuse `inject GPU attach PID` for a process the (non-root) caller does not own."""
    try:
        pid = int((value or "").strip())
        owner = psutil.Process(pid).uids().real
    except (ValueError, psutil.Error):
        return  # a bad or vanished pid: the backend's own check gives the clear message
    if owner != peer.uid:
        raise CommandError(f"attach: pid {pid} belongs to uid {owner}, not to you (uid {peer.uid})", code="refused")


@contextlib.contextmanager
def _job_errors() -> Iterator[None]:
    """A supervisor refusal becomes the control protocol's error reply."""
    try:
        yield
    except JobError as exc:
        raise CommandError(str(exc), code=exc.code) from None
