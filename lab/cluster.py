"""The whole loopback cluster: Slurm (lab.slurm), an S3 server (lab.s3) and one
`gpuguardd --simulate` per Slurm node, wired as a real deployment would be:
`[storage] url` names the shared bucket and `[slurm] drain/requeue` run the real
`scontrol` against this cluster. The cluster tests and `make demo-cluster` both
bring it up through `Cluster`, so they exercise the same thing.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lab.s3 import SeaweedS3
from lab.slurm import Slurm, poll, terminate

BIN = Path(sys.executable).parent
BUCKET = "gpuguard"


class NodeDaemon:
    """The gpuguardd of one Slurm node: its own state dir, socket and config."""

    def __init__(self, root: Path, node: str, gpus: int, config: str) -> None:
        self.node = node
        self.dir = root / node
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket = self.dir / "gpuguard.sock"
        self.config = self.dir / "config.toml"
        self.config.write_text(config)
        self.log = self.dir / "gpuguardd.log"
        self.gpus = gpus
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str], timeout_s: float = 30.0) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "gpuguardd"), "--simulate", str(self.gpus), "--config", str(self.config),
                 "--state-dir", str(self.dir / "state"), "--socket", str(self.socket)],
                stdout=out, stderr=subprocess.STDOUT, env={**env, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        proc = self.proc

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"gpuguardd on {self.node} exited {proc.returncode}:\n{self.log.read_text()}")
            return self.socket.exists() and self.ctl("status", check=False).returncode == 0

        poll(up, timeout_s, f"gpuguardd on {self.node}", self.log)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            terminate([self.proc.pid])
            self.proc.wait()

    def ctl(self, *args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(BIN / "gpuguardctl"), "--socket", str(self.socket), *args],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise RuntimeError(f"gpuguardctl {' '.join(args)} on {self.node} exited {result.returncode}: {result.stderr}")
        return result

    def status(self) -> dict[str, Any]:
        return json.loads(self.ctl("status", "--json").stdout)

    def events(self, job: str | None = None) -> list[dict[str, Any]]:
        args = ["events", "--json", "--limit", "1000"] + (["--job", job] if job else [])
        return json.loads(self.ctl(*args).stdout)

    def job(self, name: str) -> dict[str, Any] | None:
        return next((j for j in self.status()["jobs"] if j["name"] == name), None)


def daemon_config(url: str, node: str) -> str:
    """A node's config: quick polling, the shared store, and Slurm's own scontrol for
    the hand-off (run by the daemon with SLURM_CONF in its environment); `node` is the
    Slurm node this daemon serves (all share one host, so not its short name)."""
    scontrol = shutil.which("scontrol") or "scontrol"
    drain = [scontrol, "update", "nodename={node}", "state=drain", "reason={reason}"]
    requeue = [scontrol, "requeue", "{job_id}"]
    return (
        "[monitor]\npoll_interval_s = 0.2\nnvml_timeout_s = 0.5\n"
        "[jobs]\ncheckpoint_grace_s = 30\nstop_timeout_s = 10\n"
        f"[storage]\nurl = {json.dumps(url)}\n"
        f"[slurm]\ndrain = {json.dumps(drain)}\nrequeue = {json.dumps(requeue)}\nnodes = [{json.dumps(node)}]\n"
    )


class Cluster:
    """Slurm nodes n1, n2, ... each with a gpuguardd on `gpus` simulated GPUs, and one
    S3 bucket they share; everything under `workdir`, everything stopped by stop()."""

    def __init__(self, workdir: Path, nodes: Sequence[str] = ("n1", "n2"), gpus: int = 2) -> None:
        self.dir = workdir.resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)  # user munge must reach its socket under here
        self.slurm = Slurm(self.dir / "slurm", nodes)
        self.s3 = SeaweedS3(self.dir / "s3")
        self.url = f"s3://{BUCKET}/checkpoints"
        self.daemons = {n: NodeDaemon(self.dir / "nodes", n, gpus, daemon_config(self.url, n)) for n in nodes}

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """What the daemons, batch jobs and clients of this cluster run with: Slurm's
        config, the S3 endpoint and credentials, this venv first on PATH."""
        env = {**self.slurm.env(), **self.s3.env()}
        env["PATH"] = f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}"
        return env

    def start(self) -> None:
        try:
            self.slurm.start()
            self.s3.start()
            self.s3.make_bucket(BUCKET)
            for daemon in self.daemons.values():
                daemon.start(self.env())
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Daemons first (their jobs are swept with Slurm's leftovers), then Slurm, then S3."""
        try:
            for daemon in self.daemons.values():
                daemon.stop()
        finally:
            try:
                self.slurm.stop()
            finally:
                self.s3.stop()

    def stored(self, job: str) -> list[str]:
        """The keys under the job's prefix in the bucket, read from S3 itself."""
        prefix = f"{self.url.removeprefix(f's3://{BUCKET}/')}/{job}/"
        listing = self.s3.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        return sorted(o["Key"] for o in listing.get("Contents", []))

    def batch_script(
        self, path: Path, name: str, command: Sequence[str], workdir: Path, run_args: Sequence[str] = (), per_node: bool = True
    ) -> Path:
        """A batch script that runs `command` as gpuguard job `name` under the gpuguardd of
        whichever node Slurm runs it on, and ends with the job's outcome (`gpuguardctl run
        --wait`: 75 once handed back to Slurm). It runs in `workdir`/NODE when `per_node`
        (as on a node-local disk: a resume elsewhere can only come from the store), else
        in `workdir` itself (as on a cluster's shared file system)."""
        sockets = self.dir / "nodes"
        local = shlex.quote(str(workdir)) + ('/"$SLURMD_NODENAME"' if per_node else "")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "#!/bin/bash\n"
            'echo "batch: node=$SLURMD_NODENAME job=$SLURM_JOB_ID restart=${SLURM_RESTART_COUNT:-0}"\n'
            "# the gpuguardd of the node this runs on\n"
            f'export GPUGUARD_SOCKET={shlex.quote(str(sockets))}/"$SLURMD_NODENAME"/gpuguard.sock\n'
            f"mkdir -p {local}\n"
            f"exec {shlex.quote(str(BIN / 'gpuguardctl'))} run --wait --name {shlex.quote(name)} --workdir {local} "
            f"{shlex.join(run_args)} -- {shlex.join(command)}\n"
        )
        path.chmod(0o755)
        return path

    def submit(self, script: Path, out: Path) -> int:
        """sbatch --requeue; returns the job id. Not pinned (a pin would hold for the run
        after a requeue too): Slurm takes the first idle node, n1. `out` gets every run's output."""
        args = ["--requeue", "--open-mode=append", "-o", str(out), "-J", script.stem]
        return self.slurm.sbatch(script, *args, env=self.env())
