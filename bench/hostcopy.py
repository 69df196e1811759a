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
- the cost as shipped, from its parts: gpuguard-yolo measures what its
  host copy adds to the trainer's thread (a mark at each step; a copy every
  so many steps, its aftermath included: the interval holding it against a
  plain step's) and logs it with the step time; the bench times gpuguard's
  batch callbacks; those shares, plus SAVE_SHARE times the
  writer's measured cost (below), are the cost as shipped. Precise where a
  throughput difference on this VM need not be (an epoch's mean step can
  wander by about a tenth), so the A/Bs below check it rather than decide it.
- the copy's cost, in one process of AB_EPOCHS epochs: epochs alternate
  between a host copy at every optimizer step and none (epoch 1, the
  warm-up, is left out); each epoch with copies is compared with the epochs
  beside it (`paired`), so a busy spell of this shared machine hits both
  alike. The same A/B at the default budget, over DEFAULT_AB_EPOCHS
  epochs (copies spaced by it over the epochs with copies, a mark at every
  step between them, against neither), with its standard error: the check
  of the cost from its parts, without the run-to-run differences of
  separate processes. And the periodic saves' cost: the
  A/B with a copy at every step and the writer saving back to back
  (`--save-every-s 0.5`) against the copies-only A/B gives the trainer's
  time lost per second of writing; the default interval writes SAVE_SHARE
  of the time, so the cost as shipped is the default A/B plus that.
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

EPOCHS, AB_EPOCHS, STUCK_EPOCH, STUCK_BATCH = 3, 13, 2, 6
DEFAULT_AB_EPOCHS = 25  # the default budget's A/B: a small difference, so more pairs
ODD = set(range(1, AB_EPOCHS, 2))  # the A/B's epochs with copies (0-based; 0 is the warm-up)
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
import atexit
spent = [0, 0.0]  # gpuguard's batch callbacks: calls, seconds
def timed(callback):
    def run(self, trainer):
        started = time.perf_counter()
        try:
            return callback(self, trainer)
        finally:
            spent[0] += 1
            spent[1] += time.perf_counter() - started
    return run
TrainerGuard.on_train_batch_start = timed(TrainerGuard.on_train_batch_start)
TrainerGuard.on_train_batch_end = timed(TrainerGuard.on_train_batch_end)
atexit.register(lambda: print(f"gpuguard batch callbacks: {spent[0]} in {spent[1]:.6f} s", file=sys.stderr))
install = TrainerGuard.install
def install_with_hooks(self, model):
    hooks(model)  # before gpuguard's: the batch end is timed before a checkpoint can exit
    install(self, model)
    if os.environ.get("AB"):
        after_step = HostCopy.after_step
        def every_other_epoch(copier, trainer, meta, allowed=True):
            if trainer.epoch % 2 == 0:
                copier._taken_at_step += 1  # the steps of an epoch without copies do not count toward the spacing
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
    callbacks: list[float] = []  # seconds a batch in gpuguard's batch callbacks (start and end)
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
            callbacks += [2 * float(secs) / int(calls) for calls, secs in re.findall(
                r"gpuguard batch callbacks: (\d+) in ([\d.]+) s", log) if int(calls)]  # fmt: skip
            print(f"{model} round {n + 1} {setup}: median step {steps[setup][-1] * 1e3:.0f} ms", file=sys.stderr, flush=True)
    rc, log, _ = child(tmp, data, model, f"{model}-writes", ("--save-every-s", "0.5"))
    writes = [float(w) for w in re.findall(r"written in ([\d.]+)s", log)]
    if rc != 0 or not writes:
        raise SystemExit(f"{model} writes: exit {rc}, {len(writes)} periodic checkpoints\n{log[-3000:]}")
    ab = {}
    for what, flags in (("every", ("--save-every-s", "0", "--copy-budget", "inf")), ("default", ("--save-every-s", "0")),
                        ("saves", ("--save-every-s", "0.5", "--copy-budget", "inf"))):  # fmt: skip
        epochs = DEFAULT_AB_EPOCHS if what == "default" else AB_EPOCHS
        rc, log, times = child(tmp, data, model, f"{model}-ab-{what}", flags, epochs, AB="1")
        if rc != 0:
            raise SystemExit(f"{model} A/B ({what}): exit {rc}\n{log[-3000:]}")
        ab[what] = {"wall": paired(times, clock=1), "cpu": paired(times, clock=2), "se": error(times), "writing": sum(
            float(w) for w in re.findall(r"written in ([\d.]+)s", log)), "on_steps": len(intervals(times, ODD))}  # fmt: skip
    lost = {what: lost_work(tmp, data, model, hook, flags) for what, hook, flags in (
        ("stuck, default budget", "stuck", ()), ("stuck, copy every step", "stuck", ("--copy-budget", "inf")),
        ("answering", "answer", ()))}  # fmt: skip
    return {"steps": steps, "cpu": cpu, "ab": ab, "budget": budget, "callbacks": callbacks, "writes": writes, "lost": lost}


def pairs(times: list, clock: int) -> list[tuple[float, float]]:
    """The A/B's (mean step with copies, without) of each epoch with copies against its neighbours without.

    Epochs 1, 3, 5, ... (0-based) have copies, 2, 4, 6, ... none (0 is the warm-up). Pairing each with the
    epochs beside it keeps a slow spell of a shared machine out of the difference; a step over three times
    its epoch's median (a stall) is left out. Means, not medians: at the default budget copies come every
    few epochs, and a median would miss them."""
    means = {}
    for epoch in range(1, 1 + max((t[0] for t in times), default=0)):  # odd ones have copies
        steps = intervals(times, {epoch}, clock)
        if steps:
            cap = 3 * statistics.median(steps)
            means[epoch] = statistics.mean(s for s in steps if s <= cap)
    return [(means[e], statistics.mean(means[n] for n in (e - 1, e + 1) if n >= 2 and n in means))
            for e in means if e % 2 == 1 and any(n >= 2 and n in means for n in (e - 1, e + 1))]  # fmt: skip


def paired(times: list, clock: int) -> tuple[float, float]:
    """The A/B's mean step with copies and without, over its pairs."""
    found = pairs(times, clock)
    return statistics.mean(on for on, _ in found), statistics.mean(off for _, off in found)


def error(times: list) -> float:
    """The standard error of the A/B's difference (per cent, wall time): the pairs' spread over their root
    count. On this VM an epoch's mean step can wander by about a tenth (2 to 3 % after 12 pairs), or
    hardly at all (under 1 %): it is printed beside every A/B."""
    diffs = [(on / off - 1) * 100 for on, off in pairs(times, 1)]
    return statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")


def parts(r: dict) -> float:
    """Per cent of step time, from what gpuguard-yolo measured itself: a copy (with its aftermath) every
    `every` steps, a mark on each step between and its batch callbacks (one step a batch here), over the
    step time (median over the runs)."""
    shares = [(float(m) * (int(e) - 1) + float(c) + cb * 1e3 * int(e)) / (int(e) * float(s)) * 100
              for (e, c, s, m), cb in zip(r["budget"], r["callbacks"]) if float(s) > 0]  # fmt: skip
    return statistics.median(shares) if shares else float("nan")


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
    for what, label, epochs in (("every", "a host copy at every step", AB_EPOCHS),
                                ("default", "host copies and marks at the default budget", DEFAULT_AB_EPOCHS)):  # fmt: skip
        row(f"{label}, in-process A/B over {epochs} epochs: step with / without (ms; ± standard error)",
            lambda r, w=what: f"{_ab(*r['ab'][w]['wall'])} ± {r['ab'][w]['se']:.1f}")  # fmt: skip
        row("the same A/B in process CPU time a step (ms)", lambda r, w=what: _ab(*r["ab"][w]["cpu"]))
    row("periodic saves back to back beside training (`--save-every-s 0.5`, a copy at every step), in-process A/B: "
        "the trainer's time lost per second of writing", lambda r: f"{save_factor(r['ab']):.2f} s")  # fmt: skip
    writing = f"{SAVE_SHARE:.1%} of the time writing x that"
    row(f"**as shipped, from its parts: copies (with their aftermath), marks and batch callbacks as measured in the "
        f"gpuguard-yolo runs above + {writing}**", lambda r: f"**{parts(r) + save_factor(r['ab']) * SAVE_SHARE * 100:+.1f} %**")
    row(f"as shipped, A/B: the default budget's A/B + {writing} (± its standard error)",
        lambda r: f"{_pct(r['ab']['default']['wall']) + save_factor(r['ab']) * SAVE_SHARE * 100:+.1f} % "
                  f"± {r['ab']['default']['se']:.1f}")  # fmt: skip
    row(f"default budget ({BUDGET:.1%}): a copy every ... steps (its measured copy / step, ms)",
        lambda r: ", ".join(f"{e} ({c} / {s})" for e, c, s, _ in r["budget"]) or "—")
    row("a mark at every step between copies, on the trainer's thread (ms)",
        lambda r: ", ".join(m for *_, m in r["budget"]) or "—")
    row("gpuguard's batch callbacks (heartbeat, replay position, checkpoint request), a batch (ms)",
        lambda r: ", ".join(f"{cb * 1e3:.2f}" for cb in r["callbacks"]) or "—")
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


def _pct(pair: tuple[float, float]) -> float:
    return (pair[0] / pair[1] - 1) * 100


def _ab(on: float, off: float) -> str:
    return f"{on * 1e3:.1f} / {off * 1e3:.1f} ({_pct((on, off)):+.1f} %)"


def save_factor(ab: dict) -> float:
    """Step time lost per second of background writing: the saves A/B's extra over the copies-only A/B's,
    over the steps of its epochs with copies (writes follow new copies, so they fall in those epochs)."""
    saves, copies = ab["saves"], ab["every"]
    lost = (_pct(saves["wall"]) - _pct(copies["wall"])) / 100 * saves["wall"][1] * saves["on_steps"]
    return lost / saves["writing"] if saves["writing"] else float("nan")


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
        f"Measured {when:%Y-%m-%d %H:%M} UTC in {time.monotonic() - started:.0f} s; {os.cpu_count()} CPUs "
        f"(load average {load_before} at the start, {load} at the end), Python "
        f"{platform.python_version()}, torch {torch.__version__}, ultralytics {ultralytics.__version__}; "
        f"{args.rounds} runs per set-up of {EPOCHS} epochs of 8 batches, one A/B run per set-up; "
        f"stuck/answered at batch {STUCK_BATCH}/8 of epoch {STUCK_EPOCH}.\n"
    )


if __name__ == "__main__":
    sys.exit(main())
