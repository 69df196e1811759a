"""A fake Controller with canned answers, and a ControlServer on a temporary socket."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gpuguard.control.commands import CommandError, PeerCred
from gpuguard.control.server import ControlServer

UUID0 = "GPU-0a1b2c3d-0000-1111-2222-333344445555"
UUID1 = "GPU-9f8e7d6c-0000-1111-2222-333344445555"


class FakeController:
    """Records every call; canned data shaped like CONTRACT.md's JSON."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], PeerCred | None]] = []
        self.verdict = {"status": "healthy", "message": "gpuguard: all 2 GPU(s) healthy"}
        self.gpus: list[dict[str, Any]] = [
            {
                "index": 0,
                "uuid": UUID0,
                "pci_bus_id": "00000000:3B:00.0",
                "name": "Simulated H100",
                "state": "healthy",
                "reason": None,
                "jobs": ["train"],
                "temperature_c": 41,
                "gpu_util_pct": 97,
                "memory_used_bytes": 40 * 1024**3,
                "memory_total_bytes": 80 * 1024**3,
            },
            {
                "index": 1,
                "uuid": UUID1,
                "pci_bus_id": "00000000:86:00.0",
                "name": "Simulated H100",
                "state": "excluded",
                "reason": "Xid 79: GPU has fallen off the bus",
                "jobs": [],
                "temperature_c": None,
                "gpu_util_pct": None,
                "memory_used_bytes": None,
                "memory_total_bytes": None,
            },
        ]
        self.events_list: list[dict[str, Any]] = [
            {"ts": "2025-01-01T00:00:00Z", "kind": "job_started", "severity": "info", "gpu": None, "job": "train",
             "message": "train started"},
            {"ts": "2025-01-01T00:01:00Z", "kind": "xid", "severity": "critical", "gpu": UUID1, "job": None,
             "message": "Xid 79 on GPU 1", "xid": 79},
        ]

    def _record(self, name: str, *args: Any, peer: PeerCred | None = None) -> None:
        self.calls.append((name, args, peer))

    def _resolve(self, gpu: str) -> dict[str, Any]:
        for g in self.gpus:
            if gpu in (str(g["index"]), g["uuid"]):
                return g
        raise CommandError(f"no GPU {gpu!r} on this node", code="not_found")

    def status(self) -> dict[str, Any]:
        self._record("status")
        return {
            "daemon": {"version": "0.1.0", "backend": "simulated", "uptime_s": 3725.5, "pid": 4242},
            "gpus": self.gpus,
            "jobs": [
                {"name": "train", "state": "running", "gpus": [UUID0], "attempt": 2, "restarts": 1, "pid": 777,
                 "checkpoint": "/data/run/last.pt"}
            ],
        }

    def events(self, limit: int | None, gpu: str | None, job: str | None) -> list[dict[str, Any]]:
        self._record("events", limit, gpu, job)
        out = [e for e in self.events_list if job is None or e["job"] == job]
        return out[-limit:] if limit else out

    def check(self) -> dict[str, Any]:
        self._record("check")
        return self.verdict

    def healthy(self) -> list[dict[str, Any]]:
        self._record("healthy")
        return [{"index": g["index"], "uuid": g["uuid"]} for g in self.gpus if g["state"] == "healthy"]

    def snapshots(self, name: str) -> list[dict[str, Any]]:
        self._record("snapshots", name)
        if name != "train":
            raise CommandError(f"no job {name!r}", code="not_found")
        return [{"id": "s2", "path": "/data/run/.gpuguard/s2.pt", "epoch": 12}, {"id": "s1", "path": "/data/run/.gpuguard/s1.pt", "epoch": 11}]

    def exclude(self, gpu: str, reason: str | None, peer: PeerCred) -> dict[str, Any]:
        self._record("exclude", gpu, reason, peer=peer)
        g = self._resolve(gpu)
        return {"gpu": g["uuid"], "index": g["index"], "state": "excluded", "reason": reason or "excluded by operator"}

    def include(self, gpu: str, peer: PeerCred) -> dict[str, Any]:
        self._record("include", gpu, peer=peer)
        g = self._resolve(gpu)
        return {"gpu": g["uuid"], "index": g["index"], "changed": True, "state": "healthy"}

    def reset(self, gpu: str, peer: PeerCred) -> dict[str, Any]:
        self._record("reset", gpu, peer=peer)
        g = self._resolve(gpu)
        raise CommandError(f"GPU {g['index']}: nvidia-smi exited 255", code="failed")

    def inject(self, gpu: str, fault: str, value: str | None, peer: PeerCred) -> dict[str, Any]:
        self._record("inject", gpu, fault, value, peer=peer)
        if fault == "explode":
            raise RuntimeError("a bug in the daemon")
        if fault not in ("xid", "hang"):
            raise CommandError(f"unknown fault {fault!r}", code="bad_request")
        return {"gpu": self._resolve(gpu)["uuid"], "injected": f"{fault} {value or ''}".strip()}

    def run(self, spec: dict[str, Any], peer: PeerCred) -> dict[str, Any]:
        self._record("run", spec, peer=peer)
        return {"name": spec["name"], "state": "starting"}

    def stop(self, name: str, peer: PeerCred) -> dict[str, Any]:
        self._record("stop", name, peer=peer)
        if name != "train":
            raise CommandError(f"no job {name!r}", code="not_found")
        return {"name": name, "state": "stopping"}

    def rollback(self, name: str, snapshot: str | None, peer: PeerCred) -> dict[str, Any]:
        self._record("rollback", name, snapshot, peer=peer)
        return {"name": name, "snapshot": snapshot or "s1"}


@contextmanager
def serving(directory: Path, controller: FakeController | None = None, **kwargs: Any) -> Iterator[tuple[ControlServer, Path]]:
    """A started ControlServer at directory/gpuguard.sock, stopped afterwards."""
    path = directory / "gpuguard.sock"
    server = ControlServer(path, controller or FakeController(), admin_gid=kwargs.pop("admin_gid", None), **kwargs)
    server.start()
    try:
        yield server, path
    finally:
        server.stop()
