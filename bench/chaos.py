"""Chaos run: 4 simulated GPUs, 4 scripted trainer jobs, faults of every class
at random times, then the invariants that must hold.

A real gpuguardd (--simulate 4) supervises four copies of the scripted trainer
(tests/supervisor/jobs/trainer.py; one ignores the checkpoint signal). A
seeded schedule injects, at random times: Xids of each action class (13, 31,
48, 95, 119, 79), ECC single-bit bursts, pending row remaps, lost GPUs, hung
trainers (SIGSTOP), NVML hangs, crashed trainers (SIGKILL), a SIGKILLed and
restarted daemon and truncated checkpoints. A healer resets and includes GPUs
that stay out of service, as an operator would; a lost GPU needs a "node
reboot", which here is a daemon restart (the simulated GPUs live in it).

Checked at the end, printed as a table; exit 0 only if every one holds:
  - no job lost: each ends succeeded, or failed with a reason;
  - no GPU ever held by two jobs (status sampled every 0.2 s, and the live
    trainer processes' CUDA_VISIBLE_DEVICES);
  - progress never goes back past the newest valid checkpoint: each attempt
    starts at or after the step of every snapshot saved before it started;
  - no process left behind once the jobs are done and the daemon stopped;
  - the daemon's RSS and the event store stay bounded.

A full state disk (`--disk-full`, on with `--long`): the state dir is a
small tmpfs of its own (mounting needs root), and the fault fills it to
ENOSPC for a few seconds, then frees it. Without root or mount it is skipped,
and the store's own tests still cover ENOSPC (events wait in a backlog).

The seed fixes the schedule (times, classes, target picks); outcomes still
depend on timing. Usage:
  python bench/chaos.py [--seed S] [--duration S] [--long] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from gpuguard.control.client import CommandFailed, DaemonUnreachable, request

REPO = Path(__file__).resolve().parent.parent
TRAINER = REPO / "tests" / "supervisor" / "jobs" / "trainer.py"
GPUS = 4
JOBS = ("j0", "j1", "j2", "deaf")  # "deaf" ignores the checkpoint signal and SIGTERM
STEP_S = 0.05
EVERY = 20  # trainer checkpoint period, in steps: 1 s, slower than the watcher's settle time
HEAL_AFTER_S = 3.0  # a GPU out of service this long gets the operator's treatment
MAX_RSS_BYTES = 400 * 1024**2
MAX_DB_BYTES = 64 * 1024**2
CONFIG = """\
[daemon]
socket_mode = "0666"
[monitor]
poll_interval_s = 0.2
nvml_timeout_s = 0.5
hang_timeout_s = 2.0
hang_startup_timeout_s = 2.0  # a trainer stopped before its first heartbeat hangs too
[health]
restart_app_window_s = 3.0
[reset]
probation_s = 1.0
max_per_gpu_per_day = 10000
[jobs]
checkpoint_grace_s = 1.0
stop_timeout_s = 0.5
max_restarts = 500
backoff_initial_s = 0.2
backoff_max_s = 1.0
stable_after_s = 5.0
"""
# fault class -> (kind of target, inject arguments); "job" targets pick a GPU holding a job
FAULTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "xid13": ("job", ("xid", "13")),
    "xid31": ("job", ("xid", "31")),
    "xid48": ("gpu", ("xid", "48")),
    "xid95": ("gpu", ("xid", "95")),
    "xid119": ("gpu", ("xid", "119")),
    "xid79": ("gpu", ("xid", "79")),
    "ecc-sbe": ("gpu", ("ecc-sbe", "5000")),
    "remap-pending": ("gpu", ("remap-pending",)),
    "lost": ("gpu", ("lost",)),
    "nvml-hang": ("gpu", ("nvml-hang", "3")),
    "hang": ("trainer", ()),
    "crash": ("trainer", ()),
    "truncate": ("checkpoint", ()),
    "daemon-kill": ("daemon", ()),
}
LOSING = {"xid79", "lost"}  # the GPU comes back only after a "reboot"
ACTIVE = {"starting", "running", "checkpointing", "stopping"}
SNAPSHOT_SAVED = re.compile(r"saved as snapshot (\S+)")


def ts_of(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()


def read_step(path: Path) -> int | None:
    try:
        with zipfile.ZipFile(path) as archive:
            return int(pickle.loads(archive.read("archive/data.pkl"))["step"])
    except (OSError, zipfile.BadZipFile, KeyError, ValueError, EOFError, pickle.UnpicklingError):
        return None


class Daemon:
    """gpuguardd --simulate 4 as a child process, killed and restarted at will."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.state = base / "state"
        self.socket = base / "run" / "gpuguard.sock"
        self.socket.parent.mkdir(parents=True)
        self.config = base / "config.toml"
        self.config.write_text(CONFIG)
        self.log = base / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        argv = [sys.executable, "-m", "gpuguard.daemon.main", "--simulate", str(GPUS), "--config", str(self.config),
                "--state-dir", str(self.state), "--socket", str(self.socket)]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        self.starts += 1
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gpuguardd exited {self.proc.returncode}; see {self.log}")
            try:
                if request(self.socket, "status", {}, timeout_s=2)["daemon"].get("last_poll_at"):
                    return
            except (DaemonUnreachable, CommandFailed):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"gpuguardd did not come up; see {self.log}")

    def kill_and_restart(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        time.sleep(0.3)
        self.start()

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def call(self, cmd: str, **args: Any) -> Any:
        return request(self.socket, cmd, args, timeout_s=10)


@dataclass
class Record:
    """What the watcher and the injector saw, for the invariants."""

    violations: dict[str, list[str]] = field(default_factory=lambda: {"gpu": [], "progress": []})
    injected: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    heals: Counter[str] = field(default_factory=Counter)
    steps: dict[str, dict[str, int]] = field(default_factory=lambda: {name: {} for name in JOBS})
    max_rss: int = 0
    max_db: int = 0
    samples: int = 0


class Chaos:
    def __init__(self, base: Path, seed: int, duration_s: float, disk_full: bool = False) -> None:
        self.base = base
        self.rng = random.Random(seed)
        self.duration_s = duration_s
        self.daemon = Daemon(base)
        self.faults = dict(FAULTS)
        self.mounted = disk_full and mount_small_disk(self.daemon.state)
        if self.mounted:
            self.faults["disk-full"] = ("disk", ())
        self.record = Record()
        self.lock = threading.Lock()  # one actor on the daemon's life at a time
        self.done = threading.Event()
        self.out_since: dict[int, float] = {}  # GPU index -> when it was first seen out of service
        self.lost: set[int] = set()
        self.workdirs = {name: base / name for name in JOBS}

    # --- the run -----------------------------------------------------------
    def run(self) -> None:
        self.daemon.start()
        steps = max(60, int(self.duration_s * 0.5 / STEP_S))
        for name, workdir in self.workdirs.items():
            workdir.mkdir()
            flags = ["--ignore-signal"] if name == "deaf" else []
            self.daemon.call(
                "run", name=name, command=[sys.executable, str(TRAINER), "--every", str(EVERY), "--step-s", str(STEP_S),
                                           "--finish-after", str(steps), *flags],
                workdir=str(workdir), checkpoint=str(workdir / "ck.pt"), env={"PATH": os.environ.get("PATH", "")},
            )
        watcher = threading.Thread(target=self.watch, name="watch", daemon=True)
        watcher.start()
        fault_end = time.monotonic() + self.duration_s * 0.75
        for at, fault in self.schedule():
            while time.monotonic() < at:
                self.heal()
                time.sleep(0.1)
            self.inject(fault)
        while time.monotonic() < fault_end:
            self.heal()
            time.sleep(0.1)
        finish_by = time.monotonic() + max(60.0, self.duration_s)
        while time.monotonic() < finish_by and not self.all_final():
            self.heal(patience_s=0.5)
            time.sleep(0.2)
        self.done.set()
        watcher.join(timeout=5)

    def schedule(self) -> list[tuple[float, str]]:
        """Every class once in a random order, then random classes, at random times in the fault phase."""
        start = time.monotonic() + 1.0
        phase = self.duration_s * 0.75 - 1.0
        count = max(len(self.faults), int(phase / 1.5))
        classes = self.rng.sample(sorted(self.faults), len(self.faults))
        classes += [self.rng.choice(sorted(self.faults)) for _ in range(count - len(self.faults))]
        times = sorted(self.rng.uniform(0, phase) for _ in classes)
        return [(start + t, c) for t, c in zip(times, classes)]

    # --- faults ------------------------------------------------------------
    def inject(self, fault: str) -> None:
        target, args = self.faults[fault]
        pick = self.rng.random()  # drawn whatever happens, so the seed fixes every later pick
        with self.lock:
            try:
                status = self.daemon.call("status")
                done = self._inject(fault, target, args, pick, status)
            except (DaemonUnreachable, CommandFailed, psutil.Error, OSError):
                done = False
        (self.record.injected if done else self.record.skipped)[fault] += 1

    def _inject(self, fault: str, target: str, args: tuple[str, ...], pick: float, status: dict[str, Any]) -> bool:
        running = sorted((j for j in status["jobs"] if j["state"] == "running" and j["gpus"]), key=lambda j: j["name"])
        if target == "daemon":
            self.daemon.kill_and_restart()
            return True
        if target == "disk":
            fill_for(self.daemon.state / "filler", DISK_FULL_S)
            return True
        if target == "gpu":
            candidates = [g["index"] for g in status["gpus"] if g["index"] not in self.lost]
            if fault in LOSING and (self.lost or len(candidates) < GPUS):
                return False  # keep at most one GPU waiting for a reboot, so the jobs can finish
            if not candidates:
                return False
            index = candidates[int(pick * len(candidates))]
            if fault in LOSING:
                self.lost.add(index)
            self.daemon.call("inject", gpu=str(index), fault=args[0], value=args[1] if len(args) > 1 else None)
            return True
        if not running:
            return False
        job = running[int(pick * len(running))]
        if target == "job":
            self.daemon.call("inject", gpu=job["gpus"][0], fault=args[0], value=args[1])
            return True
        if target == "checkpoint":
            ck = self.workdirs[job["name"]] / "ck.pt"
            size = ck.stat().st_size
            os.truncate(ck, size // 2)  # what a kill in the middle of a plain write leaves
            return True
        trainer = self.trainer_of(job)
        if trainer is None:
            return False
        trainer.send_signal(signal.SIGSTOP if fault == "hang" else signal.SIGKILL)
        return True

    @staticmethod
    def trainer_of(job: dict[str, Any]) -> psutil.Process | None:
        if not job.get("pid"):
            return None
        for proc in psutil.Process(job["pid"]).children(recursive=True):
            if str(TRAINER) in " ".join(proc.cmdline()):
                return proc
        return None

    # --- the operator ------------------------------------------------------
    def heal(self, patience_s: float = HEAL_AFTER_S) -> None:
        """GPUs out of service for a while: reset, include; a lost one needs a reboot (daemon restart)."""
        with self.lock:
            try:
                status = self.daemon.call("status")
            except (DaemonUnreachable, CommandFailed):
                return
            now = time.monotonic()
            for gpu in status["gpus"]:
                index = gpu["index"]
                if gpu["state"] == "healthy":
                    self.out_since.pop(index, None)
                    continue
                since = self.out_since.setdefault(index, now)
                if now - since < patience_s or gpu["state"] == "resetting" or gpu["jobs"]:
                    continue
                if index in self.lost:
                    self.daemon.kill_and_restart()
                    self.lost.discard(index)
                    self.record.heals["reboot"] += 1
                for action in ("reset", "include"):  # a reset can fail (a GPU still busy): include anyway
                    try:
                        self.daemon.call(action, gpu=str(index))
                        self.record.heals[action] += 1
                    except (DaemonUnreachable, CommandFailed):
                        pass
                self.out_since[index] = now  # give it time before the next try
                return  # one action per pass: the status is stale after it

    def all_final(self) -> bool:
        try:
            jobs = self.daemon.call("status")["jobs"]
        except (DaemonUnreachable, CommandFailed):
            return False
        return len(jobs) == len(JOBS) and all(j["state"] in ("succeeded", "failed", "stopped") for j in jobs)

    # --- the watcher -------------------------------------------------------
    def watch(self) -> None:
        while not self.done.wait(0.2):
            try:
                status = request(self.daemon.socket, "status", {}, timeout_s=5)
            except (DaemonUnreachable, CommandFailed):
                status = None
            now = time.strftime("%H:%M:%S")
            if status is not None:
                self.record.samples += 1
                self.check_holders(status, now)
            self.check_processes(now)
            self.measure()
            self.read_snapshot_steps()

    def check_holders(self, status: dict[str, Any], now: str) -> None:
        for gpu in status["gpus"]:
            if len(gpu["jobs"]) > 1:
                self.record.violations["gpu"].append(f"{now} status: GPU {gpu['index']} held by {gpu['jobs']}")
        holders: dict[str, list[str]] = {}
        for job in status["jobs"]:
            if job["state"] in ACTIVE:
                for uuid in job["gpus"]:
                    holders.setdefault(uuid, []).append(job["name"])
        for uuid, names in holders.items():
            if len(names) > 1:
                self.record.violations["gpu"].append(f"{now} status: {uuid} in the GPUs of {names}")

    def check_processes(self, now: str) -> None:
        """The live trainers themselves: two jobs' processes on one GPU is a double booking."""
        holders: dict[str, set[str]] = {}
        for proc in self.trainers():
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                env = proc.environ()
            except psutil.Error:
                continue
            for uuid in filter(None, env.get("CUDA_VISIBLE_DEVICES", "").split(",")):
                holders.setdefault(uuid, set()).add(env.get("GPUGUARD_JOB", "?"))
        for uuid, names in holders.items():
            if len(names) > 1:
                self.record.violations["gpu"].append(f"{now} processes: {uuid} used by trainers of {sorted(names)}")

    def trainers(self) -> list[psutil.Process]:
        """Trainer processes of this run (their cwd is one of its workdirs)."""
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if str(TRAINER) in " ".join(proc.info["cmdline"] or ()) and Path(proc.cwd()).parent == self.base:
                    found.append(proc)
            except psutil.Error:
                continue
        return found

    def measure(self) -> None:
        proc = self.daemon.proc
        try:
            if proc is not None and proc.poll() is None:
                self.record.max_rss = max(self.record.max_rss, psutil.Process(proc.pid).memory_info().rss)
        except psutil.Error:
            pass
        size = sum(p.stat().st_size for p in self.daemon.state.glob("gpuguard.db*") if p.exists())
        self.record.max_db = max(self.record.max_db, size)

    def read_snapshot_steps(self) -> None:
        for name in JOBS:
            known = self.record.steps[name]
            for path in (self.daemon.state / "snapshots" / name).glob("*.pt"):
                if path.stem not in known and (step := read_step(path)) is not None:
                    known[path.stem] = step

    # --- the verdict -------------------------------------------------------
    def check_progress(self, events: list[dict[str, Any]]) -> None:
        """Each attempt starts at or after every snapshot saved (event time) before it started,
        and never before the attempt ahead of it. A snapshot pruned before it was read is skipped."""
        for name in JOBS:
            steps = self.record.steps[name]
            saved = [(ts_of(e), m[1]) for e in events if e["job"] == name and e["kind"] == "snapshot_saved"
                     and (m := SNAPSHOT_SAVED.search(e["message"]))]
            started = {int(e.get("attempt", 1)): ts_of(e) for e in events
                       if e["job"] == name and e["kind"] in ("job_started", "job_restarted")}
            previous = 0
            for rec in attempts(self.workdirs[name]):
                attempt, step = int(rec["env"]["GPUGUARD_ATTEMPT"]), rec["start_step"]
                resume = rec["env"].get("GPUGUARD_RESUME_FROM")
                if resume and Path(resume).stem in steps and steps[Path(resume).stem] != step:
                    self.record.violations["progress"].append(f"{name} attempt {attempt}: resumed at {step}, its snapshot holds {steps[Path(resume).stem]}")
                if step < previous:
                    self.record.violations["progress"].append(f"{name} attempt {attempt}: starts at step {step}, the attempt before started at {previous}")
                if attempt in started:
                    before = [steps[sid] for ts, sid in saved if ts < started[attempt] - 0.05 and sid in steps]
                    if before and step < max(before):
                        self.record.violations["progress"].append(
                            f"{name} attempt {attempt}: starts at step {step}, a snapshot of step {max(before)} was saved before it started")
                previous = max(previous, step)

    def verdict(self) -> int:
        try:
            status = self.daemon.call("status")
            events = self.daemon.call("events", limit=1_000_000)
        except (DaemonUnreachable, CommandFailed) as exc:
            print(f"the daemon does not answer at the end: {exc}")
            return 1
        self.check_progress(events)
        stopped = self.daemon.stop()
        time.sleep(0.5)
        left = [p for p in self.trainers() if _alive(p)]
        for proc in left:  # leave the machine clean whatever the verdict
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        jobs = {j["name"]: j for j in status["jobs"]}
        lost = [f"{n}: {jobs[n]['state'] if n in jobs else 'missing'}" for n in JOBS
                if n not in jobs or not (jobs[n]["state"] == "succeeded" or jobs[n]["state"] == "failed" and jobs[n].get("reason"))]
        rows = [
            ("no job lost", not lost, "; ".join(lost) or ", ".join(f"{n} {jobs[n]['state']} ({jobs[n]['restarts']} restarts)" for n in JOBS)),
            ("no GPU held by two jobs", not self.record.violations["gpu"],
             "; ".join(self.record.violations["gpu"][:5]) or f"{self.record.samples} status samples"),
            ("progress never behind the newest checkpoint", not self.record.violations["progress"],
             "; ".join(self.record.violations["progress"][:5]) or f"{sum(len(attempts(w)) for w in self.workdirs.values())} attempts checked against "
             f"{sum(len(s) for s in self.record.steps.values())} snapshots read"),
            ("no process left behind", not left, ", ".join(f"pid {p.pid}" for p in left) or "no trainer alive after the run"),
            ("daemon RSS bounded", self.record.max_rss < MAX_RSS_BYTES, f"max {self.record.max_rss / 2**20:.1f} MiB (limit {MAX_RSS_BYTES / 2**20:.0f})"),
            ("event store bounded", self.record.max_db < MAX_DB_BYTES, f"max {self.record.max_db / 2**20:.2f} MiB (limit {MAX_DB_BYTES / 2**20:.0f}), {len(events)} events"),
            ("daemon stopped cleanly", stopped == 0, f"exit {stopped}"),
        ]
        print("\nfaults by class (injected / skipped: no target at that moment)")
        for fault in sorted(self.faults):
            print(f"  {fault:<14} {self.record.injected[fault]:>3} / {self.record.skipped[fault]}")
        if "disk-full" not in self.faults:
            print("  disk-full      not run (needs --disk-full, root and tmpfs; see the module docstring)")
        print(f"operator actions: {dict(self.record.heals)}; daemon starts: {self.daemon.starts}")
        print("jobs:")
        for name in JOBS:
            j = jobs.get(name, {})
            print(f"  {name:<5} {j.get('state', '?'):<10} attempts {j.get('attempt', 0):>3}  restarts {j.get('restarts', 0):>3}  {j.get('reason') or ''}")
        print("\ninvariant                                     held  detail")
        for label, ok, detail in rows:
            print(f"{label:<45} {'yes' if ok else 'NO ':<5} {detail}")
        return 0 if all(ok for _, ok, _ in rows) else 1


DISK_FULL_S = 3.0
DISK_SIZE = "64m"


def mount_small_disk(path: Path) -> bool:
    """A tmpfs of its own for the state dir, so filling it harms nothing else."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE},mode=0711", "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


def fill_for(filler: Path, seconds: float) -> None:
    """Fill the disk under filler to ENOSPC, and free it again after `seconds`."""
    chunk = b"\0" * (1 << 20)
    try:
        with filler.open("wb") as f:
            while True:
                f.write(chunk)
                f.flush()
    except OSError:
        pass
    threading.Timer(seconds, lambda: filler.unlink(missing_ok=True)).start()


def attempts(workdir: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in (workdir / "attempts.jsonl").read_text().splitlines() if line]
    except FileNotFoundError:
        return []


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration", type=float, default=None, help="seconds of faults and work (default 45, 300 with --long)")
    parser.add_argument("--long", action="store_true", help="a long run: 300 s (faults for the first 225 s)")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory (daemon log, state) afterwards")
    parser.add_argument("--disk-full", action="store_true", help="also fill the state disk (a tmpfs; on with --long)")
    args = parser.parse_args(argv)
    duration = args.duration or (300.0 if args.long else 45.0)
    base = Path(tempfile.mkdtemp(prefix="gpuguard-chaos-"))
    started = time.monotonic()
    print(f"chaos: seed {args.seed}, {duration:.0f} s, {GPUS} simulated GPUs, jobs {', '.join(JOBS)}; dir {base}", flush=True)
    chaos = Chaos(base, args.seed, duration, disk_full=args.disk_full or args.long)
    try:
        chaos.run()
        code = chaos.verdict()
    finally:
        chaos.daemon.stop()
        for proc in chaos.trainers():
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        if chaos.mounted:
            subprocess.run(["umount", "-l", str(chaos.daemon.state)], check=False)
    print(f"\n{'PASS' if code == 0 else 'FAIL'} in {time.monotonic() - started:.0f} s")
    if code == 0 and not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    else:
        print(f"kept {base} (daemon.log, state/)")
    return code


if __name__ == "__main__":
    sys.exit(main())
