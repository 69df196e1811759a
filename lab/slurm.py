"""A real Slurm on loopback: a private munged, one slurmctld and one slurmd per node
name, all on this host, from a slurm.conf of our own (facts: ../shared/CLUSTER.md).

Everything lives in one work directory and answers to its own ports and munge
socket, so it never touches a system munged or Slurm. Every process started here
(and everything those start: slurmstepd, batch scripts, jobs) carries
`LAB_CLUSTER=<workdir>` in its environment, which is how `stop()` finds leftovers
of this cluster and only of this one.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
MARKER = "LAB_CLUSTER"
SLURM_BINARIES = ("slurmctld", "slurmd", "munged", "mungekey", "sbatch")
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # where Debian's packages put them


def missing_binaries() -> list[str]:
    """What of Slurm and munge is not installed (`make test-cluster` installs it)."""
    return [b for b in SLURM_BINARIES if shutil.which(b, path=SYSTEM_PATH) is None]


def free_ports(count: int) -> list[int]:
    """Ports free on loopback now (held open together so they differ)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def poll(probe: Callable[[], T], timeout_s: float, what: str, log: Path | None = None) -> T:
    """Wait for probe() to be truthy; on time-out name what, with the log's tail."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:]) if log and log.exists() else ""
            raise RuntimeError(f"lab: timed out after {timeout_s:.0f}s waiting for {what}\n{tail}")
        time.sleep(0.1)


def marked_pids(workdir: Path) -> Iterator[int]:
    """Processes whose environment carries this cluster's marker."""
    needle = f"{MARKER}={workdir}".encode() + b"\0"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes():
                yield int(entry.name)
        except OSError:  # gone, or a kernel thread
            continue


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def terminate(pids: Sequence[int], timeout_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL whatever is still there after timeout_s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout_s
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not any(alive(p) for p in pids):
            return


class Slurm:
    """One controller and `nodes` slurmd's on loopback, run as root."""

    def __init__(self, workdir: Path, nodes: Sequence[str] = ("n1", "n2")) -> None:
        self.dir = workdir.resolve()
        self.nodes = tuple(nodes)
        self.conf = self.dir / "slurm.conf"
        self.munge_dir = self.dir / "munge"  # 0700: key, seed, log
        self.munge_run = self.dir / "munge-run"  # 0755: munged wants its socket's directory open to all
        self.munge_socket = self.munge_run / "munge.sock"
        self.logs = self.dir / "log"

    def env(self) -> dict[str, str]:
        """The environment for every Slurm command and for what should talk to this cluster."""
        path = f"{os.environ.get('PATH', '')}:{SYSTEM_PATH}".lstrip(":")
        return dict(os.environ, PATH=path, SLURM_CONF=str(self.conf), **{MARKER: str(self.dir)})

    # --- bring-up ------------------------------------------------------
    def start(self, timeout_s: float = 60.0) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("lab.slurm: needs root (munged as user munge, SlurmUser=root)")
        if missing := missing_binaries():
            raise RuntimeError(f"lab.slurm: not installed: {', '.join(missing)} (make test-cluster installs them)")
        for d in (self.dir, self.logs, self.dir / "state", self.dir / "spool"):
            d.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)  # munged checks every directory above its socket
        try:
            self._start_munge(timeout_s)
            self._write_conf()
            self._daemon(["slurmctld", "-c"], self.logs / "ctld.log")
            for node in self.nodes:
                self._daemon(["slurmd", "-N", node], self.logs / f"d-{node}.log")
            poll(self._all_idle, timeout_s, f"sinfo to show {', '.join(self.nodes)} idle", self.logs / "ctld.log")
        except BaseException:
            self.stop()
            raise

    def _start_munge(self, timeout_s: float) -> None:
        for d, mode in ((self.munge_dir, 0o700), (self.munge_run, 0o755)):
            d.mkdir(exist_ok=True)
            shutil.chown(d, "munge", "munge")
            d.chmod(mode)
        key = self.munge_dir / "munge.key"
        if not key.exists():
            subprocess.run(
                ["runuser", "-u", "munge", "--", "mungekey", "-c", "-k", str(key)], check=True, timeout=30, env=self.env()
            )
        subprocess.run(
            ["runuser", "-u", "munge", "--", "munged", f"--socket={self.munge_socket}", f"--key-file={key}",
             f"--pid-file={self.munge_run / 'munged.pid'}", f"--log-file={self.munge_dir / 'munged.log'}",
             f"--seed-file={self.munge_dir / 'munged.seed'}"],
            check=True, timeout=30, env=self.env(),
        )  # fmt: skip
        poll(self.munge_socket.exists, timeout_s, "munged's socket", self.munge_dir / "munged.log")

    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        d = self.dir
        lines = [
            "ClusterName=gg",
            f"SlurmctldHost={host}",
            "SlurmUser=root",
            f"SlurmctldPort={ctld_port}",
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={d}/state",
            f"SlurmctldPidFile={d}/ctld.pid",
            f"SlurmctldLogFile={d}/log/ctld.log",
            f"SlurmdPidFile={d}/d-%n.pid",
            f"SlurmdLogFile={d}/log/d-%n.log",
            f"SlurmdSpoolDir={d}/spool/%n",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "ReturnToService=2",
            "JobRequeue=1",
            "KillWait=5",  # a requeued batch script is SIGKILLed 5 s after SIGTERM (default 30)
            *(
                f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs=1 RealMemory=1000 State=UNKNOWN"
                for n, p in zip(self.nodes, node_ports)
            ),
            f"PartitionName=main Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _daemon(self, argv: list[str], log: Path) -> None:
        """Start a Slurm daemon (it forks and writes its pid file); fail with its log."""
        result = subprocess.run(argv, env=self.env(), capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"lab.slurm: {' '.join(argv)} exited {result.returncode}: {result.stderr}\n{tail}")

    def _all_idle(self) -> bool:
        return all(self.node_state(n)[0] == "idle" for n in self.nodes)

    # --- tear-down -----------------------------------------------------
    def pid_files(self) -> list[Path]:
        return [self.dir / "ctld.pid", *(self.dir / f"d-{n}.pid" for n in self.nodes), self.munge_run / "munged.pid"]

    def stop(self) -> None:
        """Stop the daemons by their pid files, then anything else of ours still left."""
        pids = []
        for f in self.pid_files():
            try:
                pids.append(int(f.read_text().split()[0]))
            except (OSError, ValueError, IndexError):
                continue
        terminate([p for p in pids if alive(p)])
        terminate(list(marked_pids(self.dir)), timeout_s=5.0)

    # --- commands ------------------------------------------------------
    def run(self, *argv: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """A Slurm command against this cluster (SLURM_CONF set)."""
        result = subprocess.run(list(argv), env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def scontrol(self, *args: str) -> str:
        return self.run("scontrol", *args).stdout

    def squeue(self, *args: str) -> str:
        return self.run("squeue", *args).stdout

    def sbatch(self, script: Path, *args: str, env: dict[str, str] | None = None) -> int:
        """Submit a batch script; returns the job id. `env` adds to the job's environment."""
        result = subprocess.run(
            ["sbatch", "--parsable", *args, str(script)], env={**self.env(), **(env or {})},
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"sbatch exited {result.returncode}: {result.stderr.strip()}")
        return int(result.stdout.strip().split(";")[0])

    def node_state(self, node: str) -> tuple[str, str]:
        """(state, reason) as sinfo shows them: e.g. ("drained", "gpuguard: ...")."""
        out = self.run("sinfo", "-h", "-N", "-n", node, "-o", "%T|%E", check=False).stdout.strip()
        state, _, reason = out.partition("|")
        return state, reason

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, NodeList, BatchHost, Reason, Restarts, ...);
        empty once the controller has forgotten the job."""
        result = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        return dict(re.findall(r"(\S+?)=(.*?)(?= \S+=|$)", result.stdout.strip())) if result.returncode == 0 else {}

    def release(self, job_id: int) -> None:
        """Start a requeued job now. Slurm holds a requeued job back (Reason=BeginTime,
        more than 100 s on this machine), so its begin time is set to now."""
        self.scontrol("update", f"jobid={job_id}", "starttime=now")
