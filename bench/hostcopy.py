"""The host copy and background checkpoints: what a stuck trainer loses, and what they cost.

Real tiny YOLO trainings on the CPU (64 synthetic train images at 64 px,
batch 8, nbs 8: one optimizer step per batch, 8 an epoch), per model size
(yolov8n, yolov8s):

- lost work: `gpuguard-yolo train` with a bench hook that, as batch
  STUCK_BATCH of epoch 2 starts, sends the process the checkpoint signal and
  then blocks its main thread in `time.sleep` (a C call that releases the
  GIL, as a call into a GPU that is gone does); the rescue thread writes the
  state of the last optimizer step (copied from the live tensors, or the
  newest host copy) and exits 75. Lost = batches that ended after the
  position written (a resume trains them again). The same with the trainer
  answering (the signal, and the main thread goes on). With the default
  copy budget and with a copy at every step (`--copy-budget inf`).
- the copy's cost, in one process: epochs alternate between a host copy at
  every optimizer step and none (epoch 1, the warm-up, is left out), so a
  busy spell of this shared machine hits both alike; cost = the difference
  of the median times between batch ends. The same A/B at the default
  budget (copies spaced by it, a mark at every step between them, against
  neither): the cost gpuguard-yolo as shipped adds, without the
  run-to-run differences of separate processes.
- throughput against plain Ultralytics: the median time between batch ends
  inside epochs 2 and 3 (validation off, epoch-end saves excluded) for a
  plain `train()` and for gpuguard-yolo as shipped (default copy budget and
  save interval), interleaved run by run.
- a periodic checkpoint's write, in the writer thread: one run with
  `--save-every-s 0.5`, each write timed (the default interval is set from
  this time: the writer busy at most SAVE_SHARE of the time).

Usage: python bench/hostcopy.py [--rounds 2] [--models yolov8n yolov8s] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from docblock import replace_block  # noqa: E402

from gpuguard.integrations.hostcopy import BUDGET  # noqa: E402
from gpuguard.integrations.rescue import SAVE_MAX_S, SAVE_MIN_S, SAVE_SHARE  # noqa: E402

EPOCHS, AB_EPOCHS, STUCK_EPOCH, STUCK_BATCH = 3, 7, 2, 6
ARGS = ("imgsz=64", "batch=8", "nbs=8", "workers=0", "plots=False", "val=False", "seed=0")
SETUPS = {"plain": None, "gpuguard-yolo": ()}  # None: plain Ultralytics

# The child: a training whose batch ends are timed, with bench-only hooks.
# HOOK=stuck|answer: the checkpoint signal as batch HOOK_BATCH of epoch HOOK_EPOCH starts; "stuck" then
#   blocks the main thread in time.sleep. AB=1: host copies and marks only in even epochs (1-based).
CHILD = """
import json, os, signal, sys, time
sys.path.insert(0, os.environ["REPO"])
times = []
def batch_start(trainer):
    n = len([t for t in times if t[0] == trainer.epoch]) + 1
    if (trainer.epoch + 1, n) == (int(os.environ.get("HOOK_EPOCH", 0)), int(os.environ.get("HOOK_BATCH", 0))):
        os.kill(os.getpid(), signal.SIGUSR1)
        while os.environ.get("HOOK") == "stuck":
            time.sleep(3600)
def batch_end(trainer):
    times.append((trainer.epoch, time.perf_counter(), time.process_time()))
    with open(os.environ["TIMES"], "w") as f:
        json.dump(times, f)
def hooks(model):
    model.add_callback("on_train_batch_start", batch_start)
    model.add_callback("on_train_batch_end", batch_end)
args = sys.argv[1:]
if args[0] == "plain":
    from gpuguard.integrations.ultralytics import convert_args, setup_offline, split_args
    raw = split_args(args[1:])
    setup_offline(raw)
    from ultralytics import YOLO
    kwargs = convert_args(raw)
    model = YOLO(kwargs.pop("model"))
    hooks(model)
    model.train(**kwargs, device="cpu", amp=False)
    sys.exit(0)
from gpuguard.integrations.guard import TrainerGuard
from gpuguard.integrations.hostcopy import HostCopy
install = TrainerGuard.install
def install_with_hooks(self, model):
    hooks(model)  # before gpuguard's: the batch end is timed before a checkpoint can exit
    install(self, model)
    if os.environ.get("AB"):
        after_step = HostCopy.after_step
        def every_other_epoch(copier, trainer, meta, allowed=True):
            after_step(copier, trainer, meta, allowed and trainer.epoch % 2 == 1)
        HostCopy.after_step = every_other_epoch
TrainerGuard.install = install_with_hooks
from gpuguard.integrations.ultralytics import main
sys.exit(main(["train", *args[1:]]))
"""


def child(tmp: Path, data: Path, model: str, name: str, flags: tuple[str, ...] | None, epochs: int = EPOCHS,
          **env: str) -> tuple[int, str, list]:  # fmt: skip
    run = tmp / name
    run.mkdir(parents=True)
    times = run / "times.json"
    argv = [sys.executable, str(tmp / "child.py"), "plain" if flags is None else "guarded", *(flags or ()),
            f"model={model}.yaml", f"data={data}", f"project={run}", "name=r", f"epochs={epochs}", *ARGS]  # fmt: skip
    environ = {**os.environ, "REPO": str(REPO), "TIMES": str(times), "CUDA_VISIBLE_DEVICES": "",
               "YOLO_CONFIG_DIR": str(tmp / "yolo-config"), **env}  # fmt: skip
    proc = subprocess.run(argv, env=environ, capture_output=True, text=True, timeout=1800)
    return proc.returncode, proc.stdout + proc.stderr, json.loads(times.read_text()) if times.exists() else []


def intervals(times: list, epochs: set[int] | None = None, clock: int = 1) -> list[float]:
    """Seconds between consecutive batch ends within an epoch, epochs 2.. (0-based 1..) or those given;
    clock 1: wall time, 2: the process's CPU time (all its threads: less moved by other processes)."""
    return [b[clock] - a[clock] for a, b in zip(times, times[1:]) if a[0] == b[0] and (a[0] in epochs if epochs else a[0] >= 1)]


def lost_work(tmp: Path, data: Path, model: str, hook: str, flags: tuple[str, ...]) -> str:
    """Batches trained again after the resume, and (stuck) where the rescue's state came from."""
    env = {"HOOK": hook, "HOOK_EPOCH": str(STUCK_EPOCH), "HOOK_BATCH": str(STUCK_BATCH)}
    rc, log, _ = child(tmp, data, model, f"{model}-{hook}-{len(flags)}", flags, **env)
    found = re.findall(rf"checkpoint at epoch {STUCK_EPOCH}(?:/\d+)? batch (\d+)/\d+(?: from the (live state|host copy))?", log)
    if rc != 75 or not found:
        raise SystemExit(f"{model} {hook} {flags}: exit {rc}, no checkpoint\n{log[-3000:]}")
    ended = STUCK_BATCH if hook == "answer" else STUCK_BATCH - 1  # batches of the epoch that reached their end
    done, source = found[-1]
    return f"{ended - int(done)}" + (f" ({source})" if source else "")


def spread(values: list[float], fmt: str, scale: float = 1.0) -> str:
    if not values:
        return "—"
    return f"{statistics.median(values) * scale:{fmt}} ({min(values) * scale:{fmt}}..{max(values) * scale:{fmt}})"


def measure(tmp: Path, data: Path, model: str, rounds: int) -> dict:
    steps: dict[str, list[float]] = {s: [] for s in SETUPS}
    cpu: dict[str, list[float]] = {s: [] for s in SETUPS}
    budget: list[tuple[str, str, str, str]] = []
    for n in range(rounds):  # interleaved, so a busy spell of the machine hits both
        for i, (setup, flags) in enumerate(SETUPS.items()):
            rc, log, times = child(tmp, data, model, f"{model}-{n}-{i}", flags)
            if rc != 0:
                raise SystemExit(f"{model} {setup}: exit {rc}\n{log[-3000:]}")
            steps[setup].append(statistics.median(intervals(times)))
            cpu[setup].append(statistics.median(intervals(times, clock=2)))
            budget += re.findall(
                r"host copy: every (\d+) optimizer step\(s\), ([\d.]+) ms a copy, ([\d.]+) ms a step \(budget [^)]*\), "
                r"([\d.]+) ms a mark", log,
            )[-1:]  # fmt: skip
            print(f"{model} round {n + 1} {setup}: median step {steps[setup][-1] * 1e3:.0f} ms", file=sys.stderr, flush=True)
    rc, log, _ = child(tmp, data, model, f"{model}-writes", ("--save-every-s", "0.5"))
    writes = [float(w) for w in re.findall(r"written in ([\d.]+)s", log)]
    if rc != 0 or not writes:
        raise SystemExit(f"{model} writes: exit {rc}, {len(writes)} periodic checkpoints\n{log[-3000:]}")
    rc, log, times = child(tmp, data, model, f"{model}-ab", ("--save-every-s", "0", "--copy-budget", "inf"), AB_EPOCHS, AB="1")
    if rc != 0:
        raise SystemExit(f"{model} A/B: exit {rc}\n{log[-3000:]}")
    odd, even = {e for e in range(1, AB_EPOCHS) if e % 2 == 1}, {e for e in range(2, AB_EPOCHS) if e % 2 == 0}
    on, off = intervals(times, odd), intervals(times, even)
    on_cpu, off_cpu = intervals(times, odd, clock=2), intervals(times, even, clock=2)
    rc, log, times = child(tmp, data, model, f"{model}-ab-default", ("--save-every-s", "0"), AB_EPOCHS, AB="1")
    if rc != 0:
        raise SystemExit(f"{model} A/B at the default budget: exit {rc}\n{log[-3000:]}")
    default = {"on": intervals(times, odd), "off": intervals(times, even),
               "on_cpu": intervals(times, odd, clock=2), "off_cpu": intervals(times, even, clock=2)}  # fmt: skip
    lost = {what: lost_work(tmp, data, model, hook, flags) for what, hook, flags in (
        ("stuck, default budget", "stuck", ()), ("stuck, copy every step", "stuck", ("--copy-budget", "inf")),
        ("answering", "answer", ()))}  # fmt: skip
    return {"steps": steps, "cpu": cpu, "on": on, "off": off, "on_cpu": on_cpu, "off_cpu": off_cpu, "budget": budget,
            "writes": writes, "lost": lost, "default": default}  # fmt: skip


def table(results: dict[str, dict]) -> str:
    lines = ["| | " + " | ".join(results) + " |", "| --- |" + " ---: |" * len(results)]

    def row(label: str, cell) -> None:  # noqa: ANN001
        lines.append(f"| {label} | " + " | ".join(cell(r) for r in results.values()) + " |")

    row("median step, plain Ultralytics (ms; runs' medians, min..max)", lambda r: spread(r["steps"]["plain"], ".0f", 1e3))
    row("median step, gpuguard-yolo as shipped (ms)", lambda r: spread(r["steps"]["gpuguard-yolo"], ".0f", 1e3))
    row("the same, against plain (median of runs)", lambda r: f"{_ratio(r['steps']['gpuguard-yolo'], r['steps']['plain']):+.1f} %")
    row("the same in process CPU time a step (all threads), against plain",
        lambda r: f"{statistics.median(r['cpu']['gpuguard-yolo']) * 1e3:.0f} / {statistics.median(r['cpu']['plain']) * 1e3:.0f} "
                  f"({_ratio(r['cpu']['gpuguard-yolo'], r['cpu']['plain']):+.1f} %)")  # fmt: skip
    row("host copy at every step, in-process A/B: step with / without (ms)",
        lambda r: f"{statistics.median(r['on']) * 1e3:.0f} / {statistics.median(r['off']) * 1e3:.0f} "
                  f"({_ratio(r['on'], r['off']):+.1f} %)")  # fmt: skip
    row("the same A/B in process CPU time a step (ms)",
        lambda r: f"{statistics.median(r['on_cpu']) * 1e3:.0f} / {statistics.median(r['off_cpu']) * 1e3:.0f} "
                  f"({_ratio(r['on_cpu'], r['off_cpu']):+.1f} %)")  # fmt: skip
    row("host copies and marks at the default budget, in-process A/B: step with / without (ms)",
        lambda r: f"{statistics.median(r['default']['on']) * 1e3:.1f} / {statistics.median(r['default']['off']) * 1e3:.1f} "
                  f"({_ratio(r['default']['on'], r['default']['off']):+.1f} %)")  # fmt: skip
    row("the same A/B in process CPU time a step (ms)",
        lambda r: f"{statistics.median(r['default']['on_cpu']) * 1e3:.1f} / {statistics.median(r['default']['off_cpu']) * 1e3:.1f} "
                  f"({_ratio(r['default']['on_cpu'], r['default']['off_cpu']):+.1f} %)")  # fmt: skip
    row(f"default budget ({BUDGET:.1%}): a copy every ... steps (its measured copy / step, ms)",
        lambda r: ", ".join(f"{e} ({c} / {s})" for e, c, s, _ in r["budget"]) or "—")
    row("a mark at every step between copies, on the trainer's thread (ms)",
        lambda r: ", ".join(m for *_, m in r["budget"]) or "—")
    row("periodic checkpoint, written by the writer thread (s)", lambda r: spread(r["writes"], ".2f"))
    row(f"default save interval from that ({SAVE_SHARE:.1%} writing, {SAVE_MIN_S:g}..{SAVE_MAX_S:g} s)",
        lambda r: f"{min(SAVE_MAX_S, max(SAVE_MIN_S, statistics.median(r['writes']) / SAVE_SHARE)):.0f} s"
        if r["writes"] else "—")  # fmt: skip
    for what in ("stuck, default budget", "stuck, copy every step", "answering"):
        note = "; rescued from" if what.startswith("stuck") else ""
        row(f"lost work, {what} (batches{note})", lambda r, w=what: r["lost"][w])
    return "\n".join(lines)


def _ratio(a: list[float], b: list[float]) -> float:
    return (statistics.median(a) / statistics.median(b) - 1) * 100


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["yolov8n", "yolov8s"])
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    started, when = time.monotonic(), datetime.now(timezone.utc)
    load_before = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="gpuguard-hostcopy-") as name:
        tmp = Path(name)
        (tmp / "child.py").write_text(CHILD)
        from gpuguard.integrations.dataset import make_dataset

        data = make_dataset(tmp / "data", train=64, val=4, imgsz=64)
        results = {model: measure(tmp, data, model, args.rounds) for model in args.models}
    text = table(results) + "\n\n" + footer(args, started, when, load_before)
    print(text)
    if args.write_docs:
        replace_block("hostcopy", text)
    return 0


def footer(args: argparse.Namespace, started: float, when: datetime, load_before: str) -> str:
    import torch
    import ultralytics

    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"Measured {when:%Y-%m-%d %H:%M} UTC in {time.monotonic() - started:.0f} s; {os.cpu_count()} CPUs shared "
        f"with other users (load average {load_before} at the start, {load} at the end), Python "
        f"{platform.python_version()}, torch {torch.__version__}, ultralytics {ultralytics.__version__}; "
        f"{args.rounds} runs per set-up of {EPOCHS} epochs of 8 batches, one A/B run of {AB_EPOCHS} epochs; "
        f"stuck/answered at batch {STUCK_BATCH}/8 of epoch {STUCK_EPOCH}.\n"
    )


if __name__ == "__main__":
    sys.exit(main())
