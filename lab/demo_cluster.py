"""`make demo-cluster`: a real YOLO training, submitted to a real Slurm, survives its
node's GPU falling off the bus by moving to the other node.

The loopback cluster of lab.cluster (Slurm n1 and n2, SeaweedFS as the shared
checkpoint store, a gpuguardd on two simulated GPUs per node) runs `make demo`'s
tiny YOLO as an `sbatch --requeue` job under the gpuguardd of its node. Xid 79 on
its GPU on n1: gpuguard checkpoints it, waits for the snapshot to reach the bucket,
drains n1 and requeues the job; Slurm starts it on n2, whose gpuguardd fetches the
snapshot and resumes it. Every time printed is measured.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from gpuguard.demo import EPOCHS, LogTail, _ts, make_dataset, results_epochs, train_command
from lab.cluster import Cluster, NodeDaemon
from lab.slurm import missing_binaries

NAME = "yolo"
T = TypeVar("T")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="demo-cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--keep", action="store_true", help="keep the cluster's directory (logs, state) afterwards")
    args = parser.parse_args(argv)
    if missing := missing_binaries():
        raise SystemExit(f"demo-cluster: not installed: {', '.join(missing)} (make demo-cluster installs them as root)")
    workdir = Path(tempfile.mkdtemp(prefix="gpuguard-demo-cluster-"))
    started = time.monotonic()
    try:
        with Cluster(workdir) as cluster:
            code = Demo(cluster, args.epochs).run()
    finally:
        if args.keep:
            print(f"   kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"== demo-cluster took {time.monotonic() - started:.0f} s in all, bring-up and tear-down included")
    return code


class Demo:
    def __init__(self, cluster: Cluster, epochs: int) -> None:
        self.cluster = cluster
        self.slurm = cluster.slurm
        self.epochs = epochs
        nodes = cluster.dir / "nodes"
        self.tails = [LogTail(nodes / n / "state" / "jobs" / NAME / "output.log", f"   [{n} yolo] ") for n in cluster.daemons]

    def wait(self, probe: Callable[[], T], what: str, timeout_s: float = 300.0) -> T:
        """Poll until probe() holds, printing the trainer's new lines meanwhile."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = probe()
            for tail in self.tails:
                for line in tail.new_lines():
                    print(line, flush=True)
            if value:
                return value
            if time.monotonic() > deadline:
                raise SystemExit(f"demo-cluster: timed out waiting for {what} (run with --keep to read the logs)")
            time.sleep(0.1)

    def show(self, *argv: str) -> None:
        print(f"$ {' '.join(argv)}")
        print(self.slurm.run(*argv, check=False).stdout.rstrip() + "\n")

    def run(self) -> int:
        n1, n2 = self.cluster.daemons["n1"], self.cluster.daemons["n2"]
        print("== 1. Slurm (n1, n2), SeaweedFS, and a gpuguardd on 2 simulated GPUs per node\n")
        self.show("sinfo")
        print(f"   shared checkpoint store: {self.cluster.url} at {self.cluster.s3.endpoint}\n")
        data_yaml = make_dataset(self.cluster.dir / "data")

        print(f"== 2. sbatch --requeue: a real YOLO training ({self.epochs} epochs, yolov8n, CPU) under gpuguard\n")
        # the run's directory (results.csv, weights/) on a file system both nodes share, as
        # a cluster's home or scratch; the checkpoint moves through the bucket all the same
        work = self.cluster.dir / "work"
        project = work / "runs"
        command = train_command(data_yaml, project, self.epochs)
        script = self.cluster.batch_script(work / "yolo.sh", NAME, command, work, per_node=False)
        print(script.read_text())
        job_id = self.cluster.submit(script, work / "slurm-%j.out")
        self.wait(lambda: self.slurm.job(job_id).get("JobState") == "RUNNING", "the batch job to start")
        print(f"$ squeue\n{self.slurm.squeue()}")
        print("   waiting for the first epoch's checkpoint to reach the bucket ...")
        self.wait(lambda: self.cluster.stored(NAME), "the first snapshot in the bucket", 120)
        job = self.wait(lambda: n1.job(NAME), "the job on n1's gpuguardd")
        index = next(g["index"] for g in n1.status()["gpus"] if g["uuid"] == job["gpus"][0])

        print(f"\n== 3. Xid 79 (GPU has fallen off the bus) on n1's GPU {index}, the job's GPU\n")
        t_fault = time.time()
        n1.ctl("inject", str(index), "xid", "79")
        seen: list[tuple[float, str]] = [(t_fault, "n1     fault injected (kernel-log record written)")]
        self.wait(lambda: (j := n1.job(NAME)) and j["state"] == "requeued", "n1 to hand the job back to Slurm")
        state, reason = self.wait(lambda: (s := self.slurm.node_state("n1"))[0].startswith("drain") and s, "n1 drained")
        seen.append((time.time(), f"slurm  n1 {state}: {reason} (seen by polling)"))
        self.wait(lambda: int(self.slurm.job(job_id).get("Restarts", "0")) >= 1, "Slurm to requeue the job")
        pending = self.slurm.job(job_id)
        seen.append((time.time(), f"slurm  job {job_id} requeued: {pending.get('JobState')}, Reason={pending.get('Reason')} (seen by polling)"))
        print(f"$ squeue -t all\n{self.slurm.squeue('-t', 'all')}")
        # Slurm holds a requeued job back (Reason=BeginTime, over 100 s here): start it now.
        self.slurm.release(job_id)
        seen.append((time.time(), f"slurm  scontrol update jobid={job_id} starttime=now"))
        node = self.wait(lambda: (j := self.slurm.job(job_id)).get("JobState") == "RUNNING" and j["NodeList"], "the job to run again")
        seen.append((time.time(), f"slurm  job {job_id} running on {node} (seen by polling)"))
        final = self.wait(lambda: (j := n2.job(NAME)) and j["state"] in ("succeeded", "failed") and j, "the end of training", 600)
        self.wait(lambda: self.slurm.job(job_id).get("JobState") not in ("RUNNING", "COMPLETING"), "Slurm to see the end")

        print("\n== 4. Recovery timeline (measured; gpuguard's events on n1 and n2, and Slurm)\n")
        events = self.events(n1, t_fault) + self.events(n2, t_fault)
        resumed = min((t for t, label in events if label.startswith("n2     job_started")), default=float("inf"))
        routine = ("snapshot_saved:", "snapshot_uploaded:")  # once per epoch after the resume: left out
        shown = [(t, label) for t, label in events if t <= resumed or label.split()[1] not in routine]
        for t, label in sorted(seen + shown):
            print(f"   {'+' + format(1000 * (t - t_fault), '.0f') + ' ms':>10}  {label}")
        print(f"   (and {len(events) - len(shown)} snapshot_saved/snapshot_uploaded events of the later epochs)")
        epochs = results_epochs(project / "demo" / "results.csv")
        slurm_state = self.slurm.job(job_id).get("JobState")
        print(f"\n   results.csv epochs: {epochs} (requested {self.epochs}); on n2 the job {final['state']}; "
              f"Slurm job {job_id}: {slurm_state}, restarts {self.slurm.job(job_id).get('Restarts')}\n")  # fmt: skip
        self.show("sinfo", "-N", "-o", "%N %T %E")
        ok = final["state"] == "succeeded" and slurm_state == "COMPLETED" and epochs == list(range(1, self.epochs + 1))
        print("== the training completed every epoch once, across two nodes\n" if ok else "== the training did NOT complete\n")
        return 0 if ok else 1

    @staticmethod
    def events(daemon: NodeDaemon, since: float) -> list[tuple[float, str]]:
        """The daemon's events about the job and its GPUs since the fault, as timeline rows."""
        rows: list[dict[str, Any]] = [e for e in daemon.events() if _ts(e["ts"]) >= since]
        return [(_ts(e["ts"]), f"{daemon.node:<6} {e['kind']}: {e['message'][:110]}") for e in rows]


if __name__ == "__main__":
    sys.exit(main())
