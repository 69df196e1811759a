"""Time to resume and lost work: gpuguard against the usual retry loop, side by side.

The same real tiny YOLO training (yolov8n, 96 train images at 64 px, batch 8:
12 batches an epoch, 3 epochs, CPU) meets the same GPU fault in the middle of
epoch 2, after batch FAULT_BATCH, under five set-ups:

- gpuguard: a gpuguard job (`gpuguardd --simulate 2`); the fault is Xid 48
  (a double-bit ECC error: the GPU must be reset but still runs the trainer's
  calls) injected on the job's GPU. gpuguard asks for a checkpoint, the
  trainer saves at its next batch end and exits 75, gpuguard restarts it on
  the other GPU from that checkpoint. (Xid 79 would say the GPU is gone: the
  trainer's rescue thread would then not wait for it to answer.)
- baseline: bench/baseline/train_retry.py (resume from last.pt when it
  exists; Ultralytics saves it once per epoch) under retry_loop.sh (restart
  on a non-zero exit). What a real Xid 79 does to such a trainer is a crash
  of its CUDA calls: modelled by SIGKILL at the fault.
- gpuguard, hung trainer: the trainer is SIGSTOPped at the fault (a process
  stuck in a CUDA call on a GPU that is gone), then Xid 79 is injected.
- gpuguard, hung trainer, periodic checkpoints: the same, with gpuguard-yolo
  also checkpointing mid-epoch every PERIODIC_S seconds (each standing at the
  last optimizer step): the frozen trainer cannot save, so that bounds the loss.
- baseline, hung trainer: SIGSTOP and nothing else; the loop is watched for
  --hung-wait-s seconds (while the next runs go on: a stopped trainer and a
  waiting bash loop use no CPU).

Every trainer logs each batch (bench/batchlog.py, the same callback in both)
and waits at the fault batch until the fault is in place, so the fault lands
at the same point in every run. Measured per run: the phases from the fault
to the first training batch after the resume, and the lost work: batches
trained twice, counted once the resumed process has finished the faulted
epoch (per epoch from the resumed one through the faulted one, what both
processes trained beyond one epoch's batches).

Usage: python bench/resume.py [--runs 5] [--hung-wait-s 60] [--write-docs]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from docblock import replace_block  # noqa: E402

from gpuguard.control.client import request  # noqa: E402

BIN = Path(sys.executable).parent
DOCS = REPO / "docs" / "BENCHMARKS.md"
EPOCHS = 3
FAULT_EPOCH, FAULT_BATCH = 2, 6
GRACE_S, STOP_TIMEOUT_S = 5.0, 2.0
PERIODIC_S = 0.25  # the hung-trainer set-up with periodic mid-epoch checkpoints (gpuguard-yolo's default: from the measured write time, 30..600)
CONFIG = f"""[monitor]
poll_interval_s = 0.5
nvml_timeout_s = 0.5
[jobs]
checkpoint_grace_s = {GRACE_S}
stop_timeout_s = {STOP_TIMEOUT_S}
"""


@dataclass
class Result:
    """One run: phase durations in seconds (None: did not happen), lost batches."""

    phases: dict[str, float | None] = field(default_factory=dict)
    lost: int | None = None
    recovered: bool = False


def wait(predicate: Callable[[], Any], what: str, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")


def read_batches(path: Path) -> list[tuple[float, int, int, int]]:
    """(time, pid, epoch, batch) per logged batch."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        t, pid, epoch, batch = line.split()
        rows.append((float(t), int(pid), int(epoch), int(batch)))
    return rows


def fault_pid(log: Path) -> int | None:
    return next((pid for _, pid, e, b in read_batches(log) if (e, b) == (FAULT_EPOCH, FAULT_BATCH)), None)


def first_resumed(log: Path, faulted: int) -> tuple[float, int] | None:
    """(time, epoch) of the first batch of any later process."""
    return next(((t, e) for t, pid, e, _ in read_batches(log) if pid != faulted), None)


def lost_batches(log: Path, faulted: int, resumed_epoch: int) -> int | None:
    """Batches trained twice: for each epoch from the one resumed through the one faulted, the
    batches both processes trained there beyond one epoch's worth. None until the resumed
    process has finished the faulted epoch (a trainer that replays the rest of an epoch trains
    fewer batches in it, so only the whole epoch tells)."""
    rows = read_batches(log)
    if not any(pid != faulted and e > FAULT_EPOCH for _, pid, e, _ in rows):
        return None
    per_epoch = max(b for _, pid, e, b in rows if pid == faulted and e == 1)  # epoch 1 ran whole
    return sum(
        sum(1 for _, _, e, _ in rows if e == epoch) - per_epoch for epoch in range(resumed_epoch, FAULT_EPOCH + 1)
    )


def wait_lost(log: Path, faulted: int, resumed_epoch: int) -> int:
    return wait(lambda: (n := lost_batches(log, faulted, resumed_epoch)) is not None and [n], "the faulted epoch's end", 120)[0]


def bench_env(run: Path) -> dict[str, str]:
    return {
        "BENCH_BATCH_LOG": str(run / "batches.log"),
        "BENCH_FAULT_AT": f"{FAULT_EPOCH}:{FAULT_BATCH}",
        "BENCH_FAULT_FILE": str(run / "fault"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
    }


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


class Gpuguard:
    """One gpuguardd with one YOLO job, faulted once."""

    def __init__(self, run: Path, data: Path) -> None:
        self.run, self.data = run, data
        self.socket = run / "gg.sock"
        (run / "config.toml").write_text(CONFIG)
        self.log = (run / "gpuguardd.log").open("w")
        self.daemon = subprocess.Popen(
            [str(BIN / "gpuguardd"), "--simulate", "2", "--config", str(run / "config.toml"),
             "--state-dir", str(run / "state"), "--socket", str(self.socket)],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def ctl(self, *args: str) -> str:
        argv = [str(BIN / "gpuguardctl"), "--socket", str(self.socket), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout

    def measure(
        self, hung: bool, save_every_s: float | None = None, flags: tuple[str, ...] = (),
        before_fault: Callable[[], None] | None = None, xid: int = 79, stuck: bool = False,
    ) -> Result:
        """flags: more `gpuguardctl run` flags; before_fault: called at the fault batch, before the fault;
        stuck: the trainer's main thread blocks at the fault batch for good (batchlog.py), before the fault."""
        wait(lambda: self.socket.exists(), "gpuguardd", 30)
        env = [f"{k}={v}" for k, v in (bench_env(self.run) | ({"BENCH_STUCK": "1"} if stuck else {})).items()]
        periodic = ["--save-every-s", f"{save_every_s:g}"] if save_every_s else []
        self.ctl(
            "run", "--name", "yolo", "--workdir", str(self.run), *flags, "--",
            "env", *env, sys.executable, str(REPO / "bench" / "batchlog.py"), *periodic, "model=yolov8n.yaml",
            f"data={self.data}", f"epochs={EPOCHS}", "imgsz=64", "batch=8", "workers=0",
            f"project={self.run / 'runs'}", "name=bench", "plots=False",
        )  # fmt: skip
        log = self.run / "batches.log"
        pid = wait(lambda: fault_pid(log), "the fault batch", 300)
        status = request(self.socket, "status", {})
        uuid = next(j for j in status["jobs"] if j["name"] == "yolo")["gpus"][0]
        index = next(g["index"] for g in status["gpus"] if g["uuid"] == uuid)
        if before_fault is not None:
            before_fault()
        t_fault = time.time()
        if hung:
            os.kill(pid, signal.SIGSTOP)
        if stuck:  # the GPU dies under the trainer: stuck first, then the driver reports it
            (self.run / "fault").touch()
        request(self.socket, "inject", {"gpu": str(index), "fault": "xid", "value": str(xid)})  # no CLI start-up in the way
        (self.run / "fault").touch()
        t_first, epoch = wait(lambda: first_resumed(log, pid), "the first batch after the resume", 120)
        events = request(self.socket, "events", {"limit": 200})

        def first(*kinds: str) -> float:
            return min(_ts(e["ts"]) for e in events if e["kind"] in kinds and _ts(e["ts"]) >= t_fault - 0.5)

        detected = first("gpu_excluded", "checkpoint_requested")
        stopped, restarted = first("job_stopping_done"), first("job_restarted")
        return Result(
            phases={
                "detect": detected - t_fault,
                "checkpoint + stop": stopped - detected,
                "restart": restarted - stopped,
                "trainer start-up": t_first - restarted,
                "total": t_first - t_fault,
                "gpuguard's own share": (detected - t_fault) + (restarted - stopped)
                + (max(0.0, stopped - detected - GRACE_S) if hung else 0.0),
            },
            lost=wait_lost(log, pid, epoch),
            recovered=True,
        )

    def close(self) -> None:
        try:
            self.ctl("stop", "yolo")
        except subprocess.SubprocessError:
            pass
        self.daemon.terminate()
        self.daemon.wait(timeout=30)
        self.log.close()


class Baseline:
    """retry_loop.sh around train_retry.py, faulted once."""

    def __init__(self, run: Path, data: Path) -> None:
        self.run = run
        self.retry_log = run / "retry.log"
        self.out = (run / "baseline.log").open("w")
        self.loop = subprocess.Popen(
            [str(REPO / "bench" / "baseline" / "retry_loop.sh"), sys.executable,
             str(REPO / "bench" / "baseline" / "train_retry.py"), str(data), str(run / "runs"), "bench", str(EPOCHS)],
            cwd=run, stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **bench_env(run), "RETRY_LOG": str(self.retry_log)},
        )  # fmt: skip

    def loop_times(self, kind: str) -> list[float]:
        lines = self.retry_log.read_text().splitlines() if self.retry_log.exists() else []
        return [float(line.split()[-1]) for line in lines if line.startswith(kind)]

    def fault(self, hung: bool) -> None:
        """Wait for the fault batch, then crash (SIGKILL) or hang (SIGSTOP) the trainer."""
        self.pid = wait(lambda: fault_pid(self.run / "batches.log"), "the fault batch", 300)
        self.t_fault = time.time()
        os.kill(self.pid, signal.SIGSTOP if hung else signal.SIGKILL)
        (self.run / "fault").touch()

    def measure(self, timeout_s: float) -> Result:
        """Wait up to timeout_s after the fault for the first batch of a new trainer."""
        log, pid, t_fault = self.run / "batches.log", self.pid, self.t_fault
        try:
            t_first, epoch = wait(lambda: first_resumed(log, pid), "the first batch after the resume",
                                  t_fault + timeout_s - time.time())  # fmt: skip
        except TimeoutError:
            return Result(phases={"total": None, "waited": time.time() - t_fault})
        exited = next(t for t in self.loop_times("exit") if t >= t_fault)
        started = next(t for t in self.loop_times("start") if t >= exited)
        return Result(
            phases={
                "detect": exited - t_fault,  # the loop sees the crash
                "checkpoint + stop": 0.0,  # none: the process is already dead
                "restart": started - exited,
                "trainer start-up": t_first - started,
                "total": t_first - t_fault,
            },
            lost=wait_lost(log, pid, epoch),
            recovered=True,
        )

    def close(self) -> None:
        try:
            os.killpg(self.loop.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.loop.wait(timeout=30)
        self.out.close()


def one_run(setup: str, tmp: Path, data: Path, n: int) -> Result | Baseline:
    """A finished run, or a hung baseline still being watched (it needs no CPU meanwhile)."""
    run = tmp / f"{setup}-{n}"
    run.mkdir()
    hung = "-hung" in setup
    if setup.startswith("gpuguard"):
        gg = Gpuguard(run, data)
        try:
            return gg.measure(hung, PERIODIC_S if setup.endswith("-periodic") else None, xid=79 if hung else 48)
        finally:
            gg.close()
    base = Baseline(run, data)
    try:
        base.fault(hung)
        if hung:
            return base
        return base.measure(120)
    finally:
        if not hung:
            base.close()


def watched(base: Baseline, hung_wait_s: float) -> Result:
    try:
        return base.measure(hung_wait_s)
    finally:
        base.close()


SETUPS = {
    "gpuguard": "gpuguard (Xid 48, trainer responds)",
    "baseline": "baseline (Xid 79 = trainer crash)",
    "gpuguard-hung": "gpuguard (Xid 79, trainer hung)",
    "gpuguard-hung-periodic": f"gpuguard (Xid 79, trainer hung, --save-every-s {PERIODIC_S:g})",
    "baseline-hung": "baseline (Xid 79, trainer hung)",
}
PHASES = ("detect", "checkpoint + stop", "restart", "trainer start-up", "total", "gpuguard's own share")


def spread(values: list[float], scale: float = 1.0, fmt: str = ".2f") -> str:
    if not values:
        return "n/a"
    v = [x * scale for x in values]
    return f"{statistics.median(v):{fmt}} ({min(v):{fmt}}..{max(v):{fmt}})"


def table(results: dict[str, list[Result]], hung_wait_s: float) -> str:
    head = "| phase (s), median (min..max) | " + " | ".join(SETUPS[s] for s in results) + " |"
    lines = [head, "| --- |" + " ---: |" * len(results)]
    for phase in PHASES:
        cells = []
        for setup, runs in results.items():
            values = [r.phases[phase] for r in runs if r.phases.get(phase) is not None]
            if setup == "baseline-hung" and phase == "total" and not any(r.recovered for r in runs):
                waited = [r.phases["waited"] for r in runs]
                cells.append(f"no recovery within {hung_wait_s:g} s (waited {min(waited):.1f}..{max(waited):.1f})")
            else:
                cells.append(spread(values) if values else "—")
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    lost_cells = []
    for runs in results.values():
        lost = [float(r.lost) for r in runs if r.lost is not None]
        lost_cells.append(spread(lost, fmt=".0f") + " batches" if lost else "never resumed")
    lines.append("| lost work (batches trained again) | " + " | ".join(lost_cells) + " |")
    lines.append("| runs recovered | " + " | ".join(f"{sum(r.recovered for r in v)}/{len(v)}" for v in results.values()) + " |")
    return "\n".join(lines)


def footer(args: argparse.Namespace, started: float) -> str:
    import platform

    import torch
    import ultralytics

    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"\nMeasured {datetime.utcnow():%Y-%m-%d %H:%M} UTC in {time.monotonic() - started:.0f} s; "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}, "
        f"ultralytics {ultralytics.__version__}, Linux {platform.release()}; {args.runs} runs per set-up; "
        f"fault after batch {FAULT_BATCH}/12 of epoch {FAULT_EPOCH}/{EPOCHS}; checkpoint_grace_s {GRACE_S:g}, "
        f"stop_timeout_s {STOP_TIMEOUT_S:g}, poll 0.5 s; load average at the end {load}.\n"
    )


def report(results: dict[str, list[Result]], setup: str, n: int, result: Result) -> None:
    total = result.phases.get("total")
    print(f"run {n + 1} {setup}: total {f'{total:.2f} s' if total else 'no recovery'}, lost {result.lost}",
          file=sys.stderr, flush=True)  # fmt: skip
    results[setup].append(result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--hung-wait-s", type=float, default=60.0, help="how long each hung baseline is watched after its fault")
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    parser.add_argument("--write-docs", action="store_true", help=f"replace the table in {DOCS.relative_to(REPO)}")
    args = parser.parse_args(argv)
    started = time.monotonic()
    results: dict[str, list[Result]] = {s: [] for s in args.setups}
    with tempfile.TemporaryDirectory(prefix="gpuguard-bench-") as name:
        tmp = Path(name)
        subprocess.run([str(BIN / "gpuguard-yolo"), "make-dataset", str(tmp / "data"), "--train", "96"],
                       check=True, capture_output=True)  # fmt: skip
        data = tmp / "data" / "data.yaml"
        watching: list[tuple[int, Baseline]] = []
        for n in range(args.runs):  # interleaved, so a busy spell of the machine hits every set-up
            for setup in args.setups:
                outcome = one_run(setup, tmp, data, n)
                if isinstance(outcome, Baseline):
                    watching.append((n, outcome))
                    continue
                report(results, setup, n, outcome)
        for n, base in watching:  # the hung baselines were watched while the other runs went on
            report(results, "baseline-hung", n, watched(base, args.hung_wait_s))
    text = table(results, args.hung_wait_s) + "\n" + footer(args, started)
    print(text)
    if args.write_docs:
        replace_block("resume", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
