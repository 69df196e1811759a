"""Moving a job to another node: from a node fault to the first batch on the other node, phase by phase.

Each run brings up a fresh loopback cluster (lab.cluster: Slurm n1 and n2,
SeaweedFS as the shared store, a gpuguardd on 2 simulated GPUs per node), so
every run starts from the same state: both nodes idle, an empty bucket. It
submits `sbatch --requeue` of a real tiny YOLO training run through
`gpuguardctl run --wait` (bench/resume.py's trainer: gpuguard-yolo with
bench/batchlog.py's callback, which logs every batch with its time, so the
first batch on n2 is read, not guessed). The trainer lands on n1 and holds at
batch 6 of epoch 2 until Xid 79 is injected on its GPU; then every phase is
read from where it happened: n1's and n2's gpuguardd events, the slurmd log of
n2 (when it launched the batch script), the batch log.

Slurm holds a requeued job back (Reason=BeginTime; it sets the job's
EligibleTime past the requeue). In the --runs timed runs the bench, like the
cluster tests, starts it at once with `scontrol update jobid=ID starttime=now`
and reports the EligibleTime Slurm had set; in the --unforced-runs after them
Slurm starts it itself, which shows what that wait costs in all.

Usage: python bench/failover.py [--runs 3] [--unforced-runs 1] [--write-docs] [--json PATH] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from docblock import replace_block  # noqa: E402
from resume import EPOCHS, FAULT_BATCH, FAULT_EPOCH, bench_env, fault_pid, first_resumed  # noqa: E402

from gpuguard.control.client import request  # noqa: E402
from gpuguard.demo import make_dataset  # noqa: E402
from lab.cluster import Cluster, NodeDaemon  # noqa: E402
from lab.slurm import missing_binaries  # noqa: E402

T = TypeVar("T")
NAME = "failover"
# Each mark in the order it must happen, and the phase that ends at it.
MARKS = (
    ("fault", "fault injected (Xid 79 on n1)"),
    ("checkpoint_requested", "n1: detected, checkpoint asked for"),
    ("snapshot_saved", "n1: checkpoint on disk, in the ring"),
    ("snapshot_uploaded", "n1: snapshot in S3"),
    ("node_drained", "n1: node drained (scontrol update)"),
    ("job_requeued", "n1: job requeued (scontrol requeue)"),
    ("released", "Slurm: requeued job seen pending (BeginTime), `scontrol update starttime=now`"),
    ("running_n2", "Slurm: batch script launched on n2"),
    ("snapshot_fetched", "n2: snapshot fetched from S3"),
    ("job_started", "n2: trainer started"),
    ("first_batch", "n2: first batch of the resumed trainer"),
)


def wait(probe: Callable[[], T], what: str, timeout_s: float) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"failover: timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _local(stamp: str) -> float:
    """Slurm's times (logs, scontrol) are the host's local time, without a zone."""
    return datetime.fromisoformat(stamp).timestamp()


def first_event(events: list[dict[str, Any]], kind: str, after: float, says: str = "", **data: Any) -> dict[str, Any]:
    """The first event of `kind` at or after `after` whose message has `says` and whose fields include `data`."""
    for e in sorted(events, key=lambda e: e["ts"]):
        if e["kind"] == kind and _ts(e["ts"]) >= after and says in e["message"] and all(e.get(k) == v for k, v in data.items()):
            return e
    raise LookupError(f"no {kind} event {data or ''} after the fault: {[e['kind'] for e in events]}")


def launched(cluster: Cluster, node: str, job_id: int) -> float | None:
    """When slurmd on `node` launched the job's batch script (its log, milliseconds)."""
    log = cluster.slurm.logs / f"d-{node}.log"
    needle = f"Launching batch job {job_id} "
    lines = [line for line in log.read_text(errors="replace").splitlines() if needle in line] if log.exists() else []
    return _local(lines[-1][1 : lines[-1].index("]")]) if lines else None


class Run:
    """One fault on n1 and the resume on n2, in one fresh cluster."""

    def __init__(self, cluster: Cluster, data: Path) -> None:
        self.cluster, self.slurm = cluster, cluster.slurm
        self.work = cluster.dir / "work"
        self.work.mkdir()
        self.log = self.work / "batches.log"  # bench_env's
        self.command = [
            "env", *(f"{k}={v}" for k, v in bench_env(self.work).items()), sys.executable, str(REPO / "bench" / "batchlog.py"),
            "model=yolov8n.yaml", f"data={data}", f"epochs={EPOCHS}", "imgsz=64", "batch=8", "workers=0",
            f"project={self.work / 'runs'}", "name=bench", "plots=False",
        ]  # fmt: skip

    def measure(self, force: bool) -> dict[str, Any]:
        """The absolute time of every mark, and what Slurm set and saw. Unless `force`,
        Slurm starts the requeued job itself (its BeginTime, then its next scheduling pass)."""
        n1, n2 = self.cluster.daemons["n1"], self.cluster.daemons["n2"]
        # the run directory on a file system both nodes share (as the demo); the snapshot still
        # reaches n2 only through the bucket: n2's gpuguardd has none of its own
        script = self.cluster.batch_script(self.work / f"{NAME}.sh", NAME, self.command, self.work, per_node=False)
        job_id = self.cluster.submit(script, self.work / "slurm.out")
        faulted = wait(lambda: fault_pid(self.log), "the trainer on n1 to reach the fault batch", 600)
        if (first := self.slurm.job(job_id).get("NodeList")) != "n1":
            raise RuntimeError(f"failover: the job started on {first}, not n1")
        status = request(n1.socket, "status", {})
        uuid = next(j for j in status["jobs"] if j["name"] == NAME)["gpus"][0]
        index = next(g["index"] for g in status["gpus"] if g["uuid"] == uuid)
        t_fault = time.time()
        request(n1.socket, "inject", {"gpu": str(index), "fault": "xid", "value": "79"})  # no CLI start-up in the way
        (self.work / "fault").touch()  # the trainer goes on from the fault batch

        pending = wait(
            lambda: (j := self.slurm.job(job_id)).get("JobState") == "PENDING" and int(j.get("Restarts", "0")) >= 1 and j,
            "Slurm to requeue the job", 180,
        )  # fmt: skip
        t_release = time.time() if force else None
        if force:
            self.slurm.release(job_id)
        wait(lambda: self.slurm.job(job_id).get("JobState") == "RUNNING", "the job to run again", 120 if force else 600)
        node = self.slurm.job(job_id).get("NodeList")
        if node != "n2":
            raise RuntimeError(f"failover: the requeued job ran on {node}, not n2")
        t_first = wait(lambda: self.resumed(n2, faulted), "the first batch on n2", 600)[0]
        t_running = wait(lambda: launched(self.cluster, "n2", job_id), "slurmd n2's launch line", 30)
        self.slurm.run("scancel", str(job_id), check=False)  # only the resume was wanted: free the cores
        return self.marks(n1, n2, t_fault, t_release, t_running, t_first) | {
            "job_id": job_id,
            "begin_reason": pending.get("Reason"),
            "eligible": _local(pending["EligibleTime"]) if pending.get("EligibleTime", "Unknown")[0].isdigit() else None,
        }

    def resumed(self, n2: NodeDaemon, faulted: int) -> tuple[float, int] | None:
        """The first batch on n2; fails at once when the resumed trainer crashed instead."""
        job = next((j for j in request(n2.socket, "status", {})["jobs"] if j["name"] == NAME), None)
        if job is not None and job["state"] in ("backoff", "failed"):
            log = n2.dir / "state" / "jobs" / NAME / "output.log"
            raise RuntimeError(f"failover: the resumed trainer on n2 {job['state']}:\n{log.read_text(errors='replace')[-2000:]}")
        return first_resumed(self.log, faulted)

    @staticmethod
    def marks(n1: NodeDaemon, n2: NodeDaemon, t_fault: float, t_release: float | None, t_running: float, t_first: float) -> dict[str, Any]:
        before, after = n1.events(NAME), n2.events(NAME)
        asked = first_event(before, "checkpoint_requested", t_fault)
        requeued = first_event(before, "job_requeued", t_fault)
        snapshot = requeued.get("snapshot")  # the one the hand-off waited for
        uploaded = first_event(before, "snapshot_uploaded", t_fault, snapshot=snapshot)
        fetched = first_event(after, "snapshot_fetched", t_fault)
        return {
            "fault": t_fault,
            "checkpoint_requested": _ts(asked["ts"]),
            "snapshot_saved": _ts(first_event(before, "snapshot_saved", t_fault, says=f"as snapshot {snapshot}")["ts"]),
            "snapshot_uploaded": _ts(uploaded["ts"]),
            "node_drained": _ts(first_event(before, "node_drained", t_fault)["ts"]),
            "job_requeued": _ts(requeued["ts"]),
            "released": t_release,
            "running_n2": t_running,
            "snapshot_fetched": _ts(fetched["ts"]),
            "job_started": _ts(first_event(after, "job_started", t_fault)["ts"]),
            "first_batch": t_first,
            "snapshot": snapshot,
            "stored": requeued.get("stored"),
            "size": uploaded.get("size"),
            "fetched_stored_id": fetched.get("stored_id"),
        }


def one_run(data: Path, keep: bool, force: bool) -> dict[str, Any]:
    """A fresh cluster (not a resumed n1: its daemon would still exclude the faulted GPU)."""
    workdir = Path(tempfile.mkdtemp(prefix="gpuguard-failover-"))  # not under /tmp/pytest: user munge must reach it
    try:
        with Cluster(workdir) as cluster:
            return Run(cluster, data).measure(force)
    finally:
        if keep:
            print(f"kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def spread(values: list[float], bold: bool = False) -> str:
    b = "**" if bold else ""
    return f"{b}{statistics.median(values):.2f}{b} | {b}{min(values):.2f}..{max(values):.2f}{b}" if values else "— | —"


def table(runs: list[dict[str, Any]], unforced: list[dict[str, Any]]) -> str:
    lines = [f"| step (its time: since the step above) | median of {len(runs)} (s) | range (s) |", "| --- | ---: | ---: |"]
    for (prev, _), (mark, label) in zip(MARKS, MARKS[1:]):
        lines.append(f"| {label} | {spread([r[mark] - r[prev] for r in runs])} |")
    totals = [r["first_batch"] - r["fault"] for r in runs]
    lines.append(f"| **total: fault to the first batch on n2** (BeginTime cut short) | {spread(totals, bold=True)} |")
    waits = [r["eligible"] - r["job_requeued"] for r in runs + unforced if r["eligible"] is not None]
    lines.append(f"| BeginTime Slurm set on the requeued job, all {len(waits)} runs (EligibleTime − job_requeued; "
                 f"1 s resolution) | {spread(waits)} |")  # fmt: skip
    if unforced:
        lines.append(f"| not cut short ({len(unforced)} run{'s' * (len(unforced) > 1)}): job requeued → batch script launched on n2 "
                     f"| {spread([r['running_n2'] - r['job_requeued'] for r in unforced])} |")  # fmt: skip
        lines.append(f"| not cut short: **total, fault to the first batch on n2** "
                     f"| {spread([r['first_batch'] - r['fault'] for r in unforced], bold=True)} |")  # fmt: skip
    return "\n".join(lines)


def footer(runs: list[dict[str, Any]], started: float) -> str:
    """The set-up: versions, the load beside it, the snapshot's size."""
    import torch
    import ultralytics

    sizes = sorted({r["size"] for r in runs if r["size"]})
    size = "/".join(f"{s / 1e6:.1f}" for s in sizes) or "?"
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    reasons = ", ".join(sorted({str(r["begin_reason"]) for r in runs}))
    return (
        f"\n{sum(r['forced'] for r in runs)} runs with the BeginTime cut short and {sum(not r['forced'] for r in runs)} "
        f"without, a fresh cluster each. Measured {datetime.utcnow():%Y-%m-%d %H:%M} UTC in "
        f"{time.monotonic() - started:.0f} s; {os.cpu_count()} CPUs shared by Slurm, SeaweedFS, both gpuguardd "
        f"and the trainer (load average at the end {load}); Python "
        f"{platform.python_version()}, torch {torch.__version__}, ultralytics {ultralytics.__version__}; yolov8n, "
        f"fault after batch {FAULT_BATCH}/12 of epoch {FAULT_EPOCH}/{EPOCHS}; snapshot {size} MB; requeued job's "
        f"Reason before the release: {reasons}; `python bench/failover.py --write-docs`.\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs whose BeginTime is cut short (as the tests do)")
    parser.add_argument("--unforced-runs", type=int, default=1, help="runs in which Slurm starts the requeued job itself")
    parser.add_argument("--write-docs", action="store_true", help="replace the failover table in docs/BENCHMARKS.md")
    parser.add_argument("--json", type=Path, help="write every run's marks (absolute times) here")
    parser.add_argument("--keep", action="store_true", help="keep each cluster's directory (logs, state)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or missing_binaries():
        raise SystemExit("failover: needs root and Slurm/munge (make cluster-packages installs them)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill (a test's time-out) still stops the cluster
    started = time.monotonic()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gpuguard-failover-data-") as tmp:
        data = make_dataset(Path(tmp) / "data")
        for n in range(args.runs + args.unforced_runs):
            force = n < args.runs
            run = one_run(data, args.keep, force) | {"forced": force}
            runs.append(run)
            print(f"run {n + 1}{'' if force else ' (not cut short)'}: {run['first_batch'] - run['fault']:.2f} s "
                  "from the fault to the first batch on n2", file=sys.stderr, flush=True)  # fmt: skip
            if args.json:
                args.json.write_text(json.dumps({"marks": [m for m, _ in MARKS], "runs": runs}, indent=1))
    forced = [r for r in runs if r["forced"]]
    text = table(forced, [r for r in runs if not r["forced"]]) + "\n" + footer(runs, started)
    print(text)
    if args.write_docs:
        replace_block("failover", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
