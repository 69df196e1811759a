"""Helpers for the storage end-to-end tests (imported as `from tests.storage.nodes import ...`):
gpuguardd "nodes" sharing one store and the writer job."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from harness import BIN, DaemonProc, wait_until

WRITER = Path(__file__).with_name("writer.py")


def storage_config(url: str, **extra: float) -> str:
    return f'[storage]\nurl = "{url}"\n' + "".join(f"{key} = {value}\n" for key, value in extra.items())


def node(tmp: Path, name: str, url: str, **extra: float) -> DaemonProc:
    """A daemon with its own state dir and socket, on one simulated GPU, using the shared store."""
    return DaemonProc(tmp / name, gpus=1, extra_config=storage_config(url, **extra))


def start_refused(d: DaemonProc) -> tuple[int, str]:
    """Start a daemon expected to refuse its config: its exit code and what it printed."""
    result = subprocess.run(
        [str(BIN / "gpuguardd"), "--simulate", "1", "--config", str(d.config), "--state-dir", str(d.state_dir), "--socket", str(d.socket)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return result.returncode, result.stdout + result.stderr


def run_writer(d: DaemonProc, job: str, workdir: Path, step: int) -> None:
    """The writer job (no environment of ours: no AWS variable reaches it)."""
    workdir.mkdir(parents=True, exist_ok=True)
    d.ctl("run", "--no-env", "--name", job, "--workdir", str(workdir), "--checkpoint", "ck.pt", "--", sys.executable, str(WRITER), str(step))


def attempts(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / "attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def snapshots(d: DaemonProc, job: str) -> list[dict[str, Any]]:
    return list(json.loads(d.ctl("snapshots", job, "--json").stdout))


def stop_all(*daemons: DaemonProc) -> None:
    """The jobs first (a daemon's stop leaves them running), then the daemons."""
    for d in daemons:
        if d.proc is None or d.proc.poll() is not None:
            continue
        for job in d.status()["jobs"]:
            if job["state"] not in ("succeeded", "failed", "stopped"):
                d.ctl("stop", job["name"], check=False)
        wait_until(lambda d=d: all(j["state"] in ("succeeded", "failed", "stopped") for j in d.status()["jobs"]), 30.0, "jobs stopped")
        d.stop()


def second_node_resumes(tmp: Path, url: str) -> None:
    """Node a runs job `train` to a stored checkpoint (step 7); node b, a daemon of its own on
    the same store, starts `train` and must resume from it."""
    a, b = node(tmp, "a", url), node(tmp, "b", url)
    try:
        a.start()
        run_writer(a, "train", tmp / "wa", 7)
        wait_until(lambda: "snapshot_uploaded" in a.kinds("train"), 60.0, "node a's snapshot stored")
        stop_all(a)
        b.start()
        run_writer(b, "train", tmp / "wb", 0)
        (first,) = wait_until(lambda: attempts(tmp / "wb"), 60.0, "node b's job started")
        assert first["resumed_step"] == 7
        assert first["resume_from"].startswith(str(b.state_dir / "snapshots" / "train"))
        assert "snapshot_fetched" in b.kinds("train")
        assert [s["where"] for s in snapshots(b, "train")] == ["both"]
    finally:
        stop_all(a, b)
