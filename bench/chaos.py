"""Chaos run: 4 simulated GPUs, 4 scripted trainer jobs, faults of every class
at random times, then the invariants that must hold.

A real gpuguardd (--simulate 4) supervises four copies of the scripted trainer
(tests/supervisor/jobs/trainer.py), each misbehaving in its own way: `escape`
leaves a SIGTERM-proof grandchild in a session of its own, `loop` exits 75
unasked every 20 steps with a max_restarts the loop reaches half way, and
`nohandler` installs no handler for the checkpoint signal (it saves on
SIGTERM); `deaf` ignores both. A seeded schedule injects, at random times:
Xids of each action class (13, 31, 48, 95, 119, 79), ECC single-bit bursts,
pending row remaps, lost GPUs, NVML blips (1 s, shorter than the wedge limit),
NVML wedges (4 s on a GPU holding a job, longer than [health]
nvml_wedged_after_s = 2), hung trainers (SIGSTOP), crashed trainers (SIGKILL),
truncated checkpoints, a SIGKILLed and restarted daemon, the same with the
`escape` trainer SIGKILLed while no daemon runs (its grandchild escapes to
init), and a database whose first 100 bytes are overwritten while the daemon
is down (its WAL's header too: the WAL's copy of page 1 would hide the
damage, and SQLite would repair the file). A healer resets and includes GPUs that stay out of service, as an
operator would; a lost GPU needs a "node reboot", which here is a daemon
restart (the simulated GPUs live in it). Wedged GPUs are left to gpuguard.

Checked at the end, printed as a table; exit 0 only if every one holds:
  - the daemon never dies by itself (one that does is started again, as
    systemd's Restart=on-failure would, and the row says how it ended);
  - no job lost: each succeeds; `loop` may instead fail with a reason;
  - no GPU ever held by two jobs (status sampled every 0.2 s, and the live
    trainer processes' CUDA_VISIBLE_DEVICES);
  - progress never goes back past the newest valid checkpoint;
  - a wedged GPU is excluded, and returns through probation by itself; no
    GPU is excluded as wedged without a wedge (a blip is not one);
  - a hang never excludes a GPU; a repaired GPU is in service right after
    the operator's include (no Xid, suspicion or probation remembered); a
    corrupted database is rebuilt from STATE_DIR/records (state_rebuilt,
    every job and excluded GPU back);
  - no process left behind: no grandchild outlives its attempt by more than
    10 s, nothing of the run outlives the jobs and the daemon;
  - the daemon's RSS and the event store stay bounded.
Counts of what the daemon did about each shape (from its events) come with
the table, and the daemon log's job_tick_failed lines are counted.

A full state disk (`--disk-full`, on with `--long`): the state dir is a
small tmpfs of its own (mounting needs root), and the fault fills it to
ENOSPC for a few seconds, SIGKILLs the daemon and starts it again on the
full disk (again and again, as systemd would, while it exits), then frees
it. Without root or mount it is skipped, and the store's own tests still
cover ENOSPC (events wait in a backlog).

The seed fixes the schedule (times, classes, target picks); outcomes still
depend on timing. Usage:
  python bench/chaos.py [--seed S] [--duration S] [--long] [--keep]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chaos_env import (  # noqa: E402
    EVERY, GPUS, STEP_S, TRAINER, Daemon, JobKind, alive, attempts, corrupt, db_bytes, fill_for, grandchild_alive,
    job_kinds, kill_all, mount_small_disk, read_step, run_processes, ts_of,
)
from chaos_verdict import (  # noqa: E402
    WEDGE_SETTLE_S, Record, Wedge, check_hangs, check_progress, check_wedges, count_job_shapes, dedupe, job_lost,
    print_invariants, print_tables, summary,
)

from gpuguard.control.client import CommandFailed, DaemonUnreachable, request  # noqa: E402

HEAL_AFTER_S = 3.0  # a GPU out of service this long gets the operator's treatment
REPAIR_WITHIN_S = 5.0  # after the operator's reset and include, the GPU is in service within this
QUIET_S = 2.0  # a GPU faulted this recently may still be hearing about it: no repair check then
WEDGE_S = 4.0  # nvml-hang seconds of a wedge
STRAY_GRACE_S = 10.0  # a grandchild may outlive its attempt this long (the stop's SIGKILL phase)
DISK_FULL_S = 3.0
MAX_RSS_BYTES = 400 * 1024**2
MAX_DB_BYTES = 64 * 1024**2
MAX_EVENTS = 100_000
# fault class -> (kind of target, inject arguments); "job" and "wedge" pick a GPU holding a job
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
    "nvml-hang": ("gpu", ("nvml-hang", "1")),  # a blip, under nvml_wedged_after_s: never a wedge
    "nvml-wedge": ("wedge", ("nvml-hang", str(int(WEDGE_S)))),
    "hang": ("trainer", ()),
    "crash": ("trainer", ()),
    "truncate": ("checkpoint", ()),
    "daemon-kill": ("daemon", ()),
    "escape": ("escape", ()),
    "corrupt-db": ("corrupt", ()),
}
LOSING = {"xid79", "lost"}  # the GPU comes back only after a "reboot"
ACTIVE = {"starting", "running", "checkpointing", "stopping"}
FINAL = {"succeeded", "failed", "stopped"}


class Chaos:
    def __init__(self, base: Path, seed: int, duration_s: float, disk_full: bool = False) -> None:
        self.base = base
        self.rng = random.Random(seed)
        self.duration_s = duration_s
        self.steps = max(60, int(duration_s * 0.5 / STEP_S))
        self.kinds: dict[str, JobKind] = job_kinds(self.steps)
        self.daemon = Daemon(base)
        self.faults = dict(FAULTS)
        self.mounted = disk_full and mount_small_disk(self.daemon.state)
        if self.mounted:
            self.faults["disk-full"] = ("disk", ())
        self.record = Record(steps={name: {} for name in self.kinds})
        self.lock = threading.Lock()  # one actor on the daemon's life at a time
        self.done = threading.Event()
        self.out_since: dict[int, float] = {}  # GPU index -> when it was first seen out of service
        self.lost: set[int] = set()
        self.wedging: dict[int, float] = {}  # GPU index -> when its wedge was injected (left to gpuguard)
        self.touched: dict[int, float] = {}  # GPU index -> when a GPU-side fault was last injected
        self.stray_since: dict[int, float] = {}  # grandchild pid -> when its attempt was seen over
        self.events: list[dict[str, Any]] = []  # fetched before each corruption, and at the end
        self.unsaved: list[str] = []  # jobs whose newest attempt was not on disk when the daemon was killed
        self.workdirs = {name: base / name for name in self.kinds}

    # --- the run -----------------------------------------------------------
    def run(self) -> None:
        self.daemon.start()
        for name, kind in self.kinds.items():
            workdir = self.workdirs[name]
            workdir.mkdir()
            extra = {"max_restarts": kind.max_restarts} if kind.max_restarts is not None else {}
            self.daemon.call(
                "run", name=name, command=[sys.executable, str(TRAINER), "--every", str(EVERY), "--step-s", str(STEP_S),
                                           "--finish-after", str(self.steps), *kind.flags],
                workdir=str(workdir), checkpoint=str(workdir / "ck.pt"), env={"PATH": os.environ.get("PATH", "")}, **extra,
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
        gpus = {g["uuid"]: g for g in status["gpus"]}
        if target in ("daemon", "disk", "corrupt", "escape"):
            return self._inject_daemon(target, running, status)
        if target == "gpu":
            candidates = [g["index"] for g in status["gpus"] if g["index"] not in self.lost and g["index"] not in self.wedging]
            if fault in LOSING and (self.lost or len(candidates) < GPUS):
                return False  # keep at most one GPU waiting for a reboot, so the jobs can finish
            if not candidates:
                return False
            index = candidates[int(pick * len(candidates))]
            if fault in LOSING:
                self.lost.add(index)
            self.touched[index] = time.monotonic()
            self.daemon.call("inject", gpu=str(index), fault=args[0], value=args[1] if len(args) > 1 else None)
            return True
        if target in ("job", "wedge"):
            now = time.monotonic()
            running = [j for j in running if gpus[j["gpus"][0]]["index"] not in self.wedging]
            if target == "wedge":  # a clean wedge: a healthy GPU nothing else happened to lately
                running = [j for j in running if (g := gpus[j["gpus"][0]])["state"] == "healthy" and not g["excluded"]
                           and g["index"] not in self.lost and now - self.touched.get(g["index"], -1e9) > 3.0]
        if not running:
            return False
        job = running[int(pick * len(running))]
        if target in ("job", "wedge"):
            gpu = gpus[job["gpus"][0]]
            self.touched[gpu["index"]] = time.monotonic()
            self.daemon.call("inject", gpu=gpu["uuid"], fault=args[0], value=args[1])
            if target == "wedge":
                self.wedging[gpu["index"]] = time.monotonic()
                self.record.wedges.append(Wedge(gpu["uuid"], gpu["index"], time.time()))
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

    def _inject_daemon(self, target: str, running: list[dict[str, Any]], status: dict[str, Any]) -> bool:
        """The daemon's own faults: SIGKILL and restart, alone or with an escape, a full disk or a corrupt database."""
        d = self.daemon
        if target == "escape":
            job = next((j for j in running if j["name"] == "escape"), None)
            trainer = self.trainer_of(job) if job is not None else None
            if trainer is None:
                return False
            self.kill_daemon(status)
            trainer.kill()  # with no daemon (the subreaper) to take it, its grandchild goes to init
            d.start()
            return True
        if target == "disk":
            freed = fill_for(d.state / "filler", DISK_FULL_S)
            time.sleep(0.5)  # the daemon meets the full disk first
            self.kill_daemon(self.daemon.call("status"))
            failed = d.failed_starts
            d.start()  # on the full disk: while it exits at start, it is started again
            self.record.outcomes["disk-full: daemon SIGKILLed, started on the full disk"] += 1
            self.record.outcomes["disk-full: up again before the disk was freed"] += not freed.is_set()
            self.record.outcomes["disk-full: exited at start, started again"] += d.failed_starts - failed
            return True
        if target == "corrupt":
            self.collect_events()  # the events die with the file
            self.kill_daemon(status)
            saved, quarantined = d.saved_attempts(), d.quarantined()
            corrupt(d.state / "gpuguard.db")
            since = time.time()
            d.start()
            self.check_rebuilt(saved, quarantined, since)
            aside = self.base / "corrupt-db"
            aside.mkdir(exist_ok=True)
            for path in d.state.glob("gpuguard.db.corrupt*"):  # the operator keeps them off the small disk
                shutil.move(str(path), str(aside / path.name))
            return True
        self.kill_daemon(status)
        d.start()
        return True

    def kill_daemon(self, status: dict[str, Any]) -> None:
        """SIGKILL the daemon; note each job whose newest attempt (in status just before) was not on disk."""
        self.daemon.kill()
        saved = self.daemon.saved_attempts()
        for job in status["jobs"]:
            if saved.get(job["name"], 0) < job["attempt"]:
                self.record.outcomes["daemon SIGKILL: a job's newest attempt not on disk"] += 1
                self.unsaved.append(f"{time.strftime('%H:%M:%S')} {job['name']} attempt {job['attempt']} "
                                    f"({job['state']}), records file at attempt {saved.get(job['name'])}")

    def check_rebuilt(self, saved: dict[str, int], quarantined: set[str], since: float) -> None:
        """Right after a start on a corrupted database: a state_rebuilt event, every job back at
        the attempt its records file held or later, every GPU the records held as excluded still excluded."""
        status = self.daemon.call("status")
        events = self.daemon.call("events", limit=MAX_EVENTS)
        rebuilt = [e for e in events if e["kind"] == "state_rebuilt" and ts_of(e) >= since - 1.0]
        jobs = {j["name"]: j["attempt"] for j in status["jobs"]}
        excluded = {g["uuid"] for g in status["gpus"] if g["excluded"]}
        wrong = [f"job {n} {'missing' if n not in jobs else f'at attempt {jobs[n]}, its record {a}'}"
                 for n, a in saved.items() if jobs.get(n, -1) < a]
        wrong += [f"GPU {u[:12]} no longer excluded" for u in sorted(quarantined - excluded)]
        if not rebuilt:
            wrong.append("no state_rebuilt event")
        if wrong:
            self.record.fail("rebuild", f"{time.strftime('%H:%M:%S')} after corruption: {', '.join(wrong)}")
        else:
            self.record.outcomes["corrupt-db: rebuilt from records (state_rebuilt)"] += 1

    def collect_events(self) -> None:
        self.events.extend(self.daemon.call("events", limit=MAX_EVENTS))

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
        """GPUs out of service for a while: reset, include; a lost one needs a reboot (daemon restart).
        A wedged GPU is gpuguard's to bring back; the operator steps in only after WEDGE_SETTLE_S."""
        with self.lock:
            self.revive()
            try:
                status = self.daemon.call("status")
            except (DaemonUnreachable, CommandFailed):
                return
            now = time.monotonic()
            for gpu in status["gpus"]:
                index = gpu["index"]
                if index in self.wedging:
                    if gpu["state"] == "healthy" and now - self.wedging[index] > WEDGE_S + 0.5:
                        del self.wedging[index]  # back by itself
                    elif now - self.wedging[index] < WEDGE_SETTLE_S:
                        continue
                    else:
                        del self.wedging[index]  # the invariant says so; the operator takes over
                if gpu["state"] == "healthy":
                    self.out_since.pop(index, None)
                    continue
                since = self.out_since.setdefault(index, now)
                if now - since < patience_s or gpu["state"] == "resetting" or gpu["jobs"]:
                    continue
                if index in self.lost:
                    self.kill_daemon(status)
                    self.daemon.start()
                    self.lost.discard(index)
                    self.record.heals["reboot"] += 1
                reset = False
                for action in ("reset", "include"):  # a reset can fail (a GPU still busy): include anyway
                    try:
                        self.daemon.call(action, gpu=str(index))
                        self.record.heals[action] += 1
                        reset = reset or action == "reset"
                    except (DaemonUnreachable, CommandFailed):
                        pass
                if reset and time.monotonic() - self.touched.get(index, -1e9) > QUIET_S:
                    self.check_repaired(index)
                self.out_since[index] = now  # give it time before the next try
                return  # one action per pass: the status is stale after it

    def revive(self) -> None:
        """The daemon died by itself (not one of the run's SIGKILLs): note how, and start it as systemd would."""
        try:
            ended = self.daemon.revive()
        except RuntimeError as exc:
            ended = str(exc)
        if ended is not None:
            self.record.fail("died", f"{time.strftime('%H:%M:%S')} gpuguardd {ended}")

    def check_repaired(self, index: int) -> None:
        """After a good reset and include, nothing remembered keeps the GPU out: no Xid, no suspicion, no probation."""
        deadline = time.monotonic() + REPAIR_WITHIN_S
        gpu: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                gpu = next(g for g in self.daemon.call("status")["gpus"] if g["index"] == index)
            except (DaemonUnreachable, CommandFailed):
                gpu = {}
            if gpu.get("state") == "healthy" and not gpu.get("excluded"):
                if gpu.get("suspect"):
                    self.record.fail("repair", f"GPU {index}: still suspect of {gpu['suspect']} after include")
                else:
                    self.record.outcomes["include after repair: back in service"] += 1
                return
            time.sleep(0.1)
        self.record.fail("repair", f"{time.strftime('%H:%M:%S')} GPU {index}: reset and included, still {gpu.get('state')}: {gpu.get('reason')}")

    def all_final(self) -> bool:
        try:
            jobs = self.daemon.call("status")["jobs"]
        except (DaemonUnreachable, CommandFailed):
            return False
        return len(jobs) == len(self.kinds) and all(j["state"] in FINAL for j in jobs)

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
                self.check_strays(status, now)
            self.check_processes(now)
            self.measure()
            self.read_snapshot_steps()

    def check_holders(self, status: dict[str, Any], now: str) -> None:
        for gpu in status["gpus"]:
            if len(gpu["jobs"]) > 1:
                self.record.fail("gpu", f"{now} status: GPU {gpu['index']} held by {gpu['jobs']}")
        holders: dict[str, list[str]] = {}
        for job in status["jobs"]:
            if job["state"] in ACTIVE:
                for uuid in job["gpus"]:
                    holders.setdefault(uuid, []).append(job["name"])
        for uuid, names in holders.items():
            if len(names) > 1:
                self.record.fail("gpu", f"{now} status: {uuid} in the GPUs of {names}")

    def check_processes(self, now: str) -> None:
        """The live trainers themselves: two jobs' processes on one GPU is a double booking."""
        holders: dict[str, set[str]] = {}
        for proc, kind in run_processes(self.base, self.daemon.state, self.daemon.proc.pid if self.daemon.proc else None):
            try:
                if kind != "trainer" or proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                env = proc.environ()
            except psutil.Error:
                continue
            for uuid in filter(None, env.get("CUDA_VISIBLE_DEVICES", "").split(",")):
                holders.setdefault(uuid, set()).add(env.get("GPUGUARD_JOB", "?"))
        for uuid, names in holders.items():
            if len(names) > 1:
                self.record.fail("gpu", f"{now} processes: {uuid} used by trainers of {sorted(names)}")

    def check_strays(self, status: dict[str, Any], now: str) -> None:
        """A grandchild may outlive its attempt only as long as the stop takes."""
        jobs = {j["name"]: j for j in status["jobs"]}
        clock = time.monotonic()
        for name, kind in self.kinds.items():
            job = jobs.get(name)
            if "--child-session" not in kind.flags or job is None:
                continue
            for rec in attempts(self.workdirs[name]):
                pid, attempt = rec.get("grandchild"), int(rec["env"]["GPUGUARD_ATTEMPT"])
                if not pid:
                    continue
                self.record.grandchildren.add(pid)
                over = job["state"] not in ACTIVE or attempt < job["attempt"]
                if not over or self.stray_since.get(pid) == -1.0 or not grandchild_alive(pid):
                    continue
                since = self.stray_since.setdefault(pid, clock)
                if clock - since >= STRAY_GRACE_S:
                    self.stray_since[pid] = -1.0  # reported once
                    self.record.fail("strays", f"{now} {name} attempt {attempt}: its grandchild (pid {pid}) outlived the attempt by "
                                     f"{STRAY_GRACE_S:.0f} s (job {job['state']}, attempt {job['attempt']})")

    def measure(self) -> None:
        proc = self.daemon.proc
        try:
            if proc is not None and proc.poll() is None:
                self.record.max_rss = max(self.record.max_rss, psutil.Process(proc.pid).memory_info().rss)
        except psutil.Error:
            pass
        self.record.max_db = max(self.record.max_db, db_bytes(self.daemon.state))

    def read_snapshot_steps(self) -> None:
        for name in self.kinds:
            known = self.record.steps[name]
            for path in (self.daemon.state / "snapshots" / name).glob("*.pt"):
                if path.stem not in known and (step := read_step(path)) is not None:
                    known[path.stem] = step

    # --- the verdict -------------------------------------------------------
    def verdict(self) -> int:
        with self.lock:
            self.revive()
        try:
            status = self.daemon.call("status")
            self.collect_events()
        except (DaemonUnreachable, CommandFailed) as exc:
            print(f"the daemon does not answer at the end: {exc}")
            return 1
        events = dedupe(self.events)
        record = self.record
        checked = check_progress(events, record, self.workdirs)
        check_wedges(events, record, self.daemon.down_at)
        check_hangs(events, record)
        count_job_shapes(events, record)
        stopped = self.daemon.stop()
        time.sleep(0.5)
        left = [(p, k) for p, k in run_processes(self.base, self.daemon.state, None) if alive(p)]
        kill_all(left)  # leave the machine clean whatever the verdict
        jobs = {j["name"]: j for j in status["jobs"]}
        lost = [why for n, k in self.kinds.items() if (why := job_lost(n, k, jobs.get(n)))]
        v = record.violations
        wedges = f"{len(record.wedges)} wedges: " + (", ".join(f"{n} {w.split(': ')[1]}" for w, n in sorted(record.outcomes.items())
                                                             if w.startswith("wedge:")) or "none injected")
        rows = [
            ("daemon never died by itself", not v["died"], summary(v["died"]) or "only the run's SIGKILLs"),
            ("no job lost", not lost, "; ".join(lost) or ", ".join(f"{n} {jobs[n]['state']} ({jobs[n]['restarts']} restarts)" for n in self.kinds)),
            ("no GPU held by two jobs", not v["gpu"], summary(v["gpu"]) or f"{record.samples} status samples"),
            ("progress never behind the newest checkpoint", not v["progress"],
             summary(v["progress"]) or f"{checked} attempts checked against {sum(len(s) for s in record.steps.values())} snapshots read"),
            ("wedged GPU excluded, back via probation", not v["wedge"], summary(v["wedge"]) or wedges),
            ("a hang never excludes its GPU", not v["hang"], summary(v["hang"]) or
             f"{record.outcomes['hang: job_hung events']} hangs, {record.outcomes['hang: GPUs made suspect']} GPUs made suspect, none excluded"),
            ("repaired GPU in service after include", not v["repair"], summary(v["repair"]) or
             f"{record.outcomes['include after repair: back in service']} GPUs back after reset + include"),
            ("corrupt database rebuilt from records", not v["rebuild"], summary(v["rebuild"]) or
             f"{record.outcomes['corrupt-db: rebuilt from records (state_rebuilt)']} of {record.injected['corrupt-db']} rebuilt"),
            ("no process left behind", not left and not v["strays"],
             summary([*(f"pid {p.pid} ({k}) alive at the end" for p, k in left), *v["strays"]])
             or f"nothing alive after the run ({len(record.grandchildren)} grandchildren seen)"),
            ("daemon RSS bounded", record.max_rss < MAX_RSS_BYTES, f"max {record.max_rss / 2**20:.1f} MiB (limit {MAX_RSS_BYTES / 2**20:.0f})"),
            ("event store bounded", record.max_db < MAX_DB_BYTES, f"max {record.max_db / 2**20:.2f} MiB (limit {MAX_DB_BYTES / 2**20:.0f}), {len(events)} events"),
            ("daemon stopped cleanly", stopped == 0, f"exit {stopped}"),
        ]
        record.outcomes["daemon log: job_tick_failed (a job's tick raised)"] += self.daemon.logged("job_tick_failed")
        starts = f"daemon starts: {self.daemon.starts} ({self.daemon.failed_starts} exited at start and were started again)"
        print_tables(self.faults, record, jobs, self.kinds, starts, "disk-full" in self.faults, self.unsaved)
        print_invariants(rows)
        return 0 if all(ok for _, ok, _ in rows) else 1


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
    chaos = Chaos(base, args.seed, duration, disk_full=args.disk_full or args.long)
    print(f"chaos: seed {args.seed}, {duration:.0f} s, {GPUS} simulated GPUs, jobs {', '.join(chaos.kinds)}; dir {base}", flush=True)
    code = 1
    try:
        chaos.run()
        code = chaos.verdict()
    finally:
        chaos.daemon.stop()
        kill_all(run_processes(base, chaos.daemon.state, None))
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
