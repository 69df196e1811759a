"""The chaos run's verdict: what was seen, the checks on the daemon's events,
and the tables bench/chaos.py prints."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos_env import JobKind, attempts, ts_of

SNAPSHOT_SAVED = re.compile(r"saved as snapshot (\S+)")
WRAPPER_PID = re.compile(r"started on .*\(pid (\d+)\)")
WEDGED = "NVML wedged"  # how gpuguard's reason for a wedge exclusion starts
WEDGE_SETTLE_S = 20.0  # a wedge must be excluded and back within this (hang 4 s + probation 1 s + slack)
CHECKS = ("died", "gpu", "progress", "wedge", "hang", "repair", "rebuild", "strays")


@dataclass
class Wedge:
    """One NVML wedge injected on a GPU that held a job."""

    gpu: str  # uuid
    index: int
    at: float  # time.time()


@dataclass
class Record:
    """What the watcher, the injector and the operator saw, for the invariants."""

    violations: dict[str, list[str]] = field(default_factory=lambda: {name: [] for name in CHECKS})
    injected: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    heals: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)  # what the daemon did about a shape, counted as it happened
    steps: dict[str, dict[str, int]] = field(default_factory=dict)
    wedges: list[Wedge] = field(default_factory=list)
    grandchildren: set[int] = field(default_factory=set)
    max_rss: int = 0
    max_db: int = 0
    samples: int = 0

    def fail(self, check: str, what: str) -> None:
        self.violations[check].append(what)


def check_progress(events: list[dict[str, Any]], record: Record, workdirs: Mapping[str, Path]) -> int:
    """Each attempt starts at or after every snapshot saved (event time) before it started,
    and never before the attempt ahead of it. A snapshot pruned before it was read is skipped.
    An attempt is matched to its start event by number and wrapper pid: a number can repeat
    when a daemon died before it could save the attempt. Returns how many attempts were checked."""
    checked = 0
    for name, workdir in workdirs.items():
        steps = record.steps.get(name, {})
        saved = [(ts_of(e), m[1]) for e in events if e["job"] == name and e["kind"] == "snapshot_saved"
                 and (m := SNAPSHOT_SAVED.search(e["message"]))]
        started = {(int(e.get("attempt", 1)), int(m[1])): ts_of(e) for e in events
                   if e["job"] == name and e["kind"] in ("job_started", "job_restarted") and (m := WRAPPER_PID.search(e["message"]))}
        previous = 0
        for rec in attempts(workdir):
            checked += 1
            attempt, step = int(rec["env"]["GPUGUARD_ATTEMPT"]), rec["start_step"]
            key = (attempt, int(rec["env"].get("GPUGUARD_WRAPPER_PID", 0)))
            resume = rec["env"].get("GPUGUARD_RESUME_FROM")
            if resume and Path(resume).stem in steps and steps[Path(resume).stem] != step:
                record.fail("progress", f"{name} attempt {attempt}: resumed at {step}, its snapshot holds {steps[Path(resume).stem]}")
            if step < previous:
                record.fail("progress", f"{name} attempt {attempt}: starts at step {step}, the attempt before started at {previous}")
            if key in started:
                before = [steps[sid] for ts, sid in saved if ts < started[key] - 0.05 and sid in steps]
                if before and step < max(before):
                    record.fail("progress", f"{name} attempt {attempt}: starts at step {step}, a snapshot of step {max(before)} was saved before it started")
            previous = max(previous, step)
    return checked


def check_wedges(events: list[dict[str, Any]], record: Record, down_at: Iterable[float]) -> None:
    """Each wedge: its GPU excluded as wedged, then back in service by gpuguard once NVML
    answered and probation passed, with no operator; a wedge that a daemon restart cut
    short (the simulated GPUs live in the daemon; events in its backlog die with it) is
    only counted. No GPU is excluded as wedged without a wedge (an NVML blip is not one)."""
    downs = sorted(down_at)
    for w in record.wedges:
        mine = [e for e in events if e["gpu"] == w.gpu and w.at - 0.5 <= ts_of(e) <= w.at + WEDGE_SETTLE_S]
        out = next((e for e in mine if e["kind"] == "gpu_excluded" and WEDGED in e["message"]), None)
        back = out and next((e for e in mine if e["kind"] == "gpu_included" and ts_of(e) > ts_of(out)), None)
        if out is not None and back is not None and back.get("by") == "gpuguard":
            record.outcomes["wedge: excluded, back through probation"] += 1
        elif any(w.at <= t <= w.at + WEDGE_SETTLE_S for t in downs):
            record.outcomes["wedge: cut short by a daemon restart"] += 1
        elif out is None:
            record.fail("wedge", f"GPU {w.index}: NVML hung at {time.strftime('%H:%M:%S', time.localtime(w.at))} for 4 s, never excluded as wedged")
        elif back is None:
            record.fail("wedge", f"GPU {w.index}: excluded as wedged, not back within {WEDGE_SETTLE_S:.0f} s")
        else:
            record.fail("wedge", f"GPU {w.index}: excluded as wedged, returned by {back.get('by')}, not through probation")
    for e in events:
        if e["kind"] == "gpu_excluded" and WEDGED in e["message"]:
            t = ts_of(e)
            if not any(w.gpu == e["gpu"] and w.at <= t <= w.at + WEDGE_SETTLE_S for w in record.wedges):
                record.fail("wedge", f"{e['ts']} {e['message'][:90]}: no wedge was injected")


def check_hangs(events: list[dict[str, Any]], record: Record) -> None:
    """A job's hang makes its GPU suspect, never excluded (so no operator is needed)."""
    for e in events:
        if e["kind"] == "gpu_excluded" and re.search(r"\bhung\b|\bhang\b", e["message"]):
            record.fail("hang", f"{e['ts']} {e['message'][:100]}")
    record.outcomes["hang: job_hung events"] += sum(1 for e in events if e["kind"] == "hang")
    record.outcomes["hang: GPUs made suspect"] += sum(1 for e in events if e["kind"] == "gpu_suspect")


def count_job_shapes(events: list[dict[str, Any]], record: Record) -> None:
    """What the daemon did about the jobs' own misbehaviour, from its events."""
    kinds = Counter((e["kind"], e["job"]) for e in events)
    record.outcomes["exit 75 unasked (loop): restart requests"] += kinds["job_restart_requested", "loop"]
    for name in ("nohandler", "deaf"):
        record.outcomes[f"checkpoint_unsupported ({name}): SIGTERM at once"] += kinds["checkpoint_unsupported", name]


def dedupe(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events fetched before a database was corrupted and after, each once, in time order."""
    seen: dict[tuple[Any, ...], dict[str, Any]] = {}
    for e in events:
        seen.setdefault((e["ts"], e["kind"], e["gpu"], e["job"], e["message"]), e)
    return sorted(seen.values(), key=ts_of)


def job_lost(name: str, kind: JobKind, job: dict[str, Any] | None) -> str | None:
    """Why the job counts as lost, or None: every job succeeds, one that may fail fails with a reason."""
    if job is None:
        return f"{name}: missing"
    if job["state"] == "succeeded" or kind.may_fail and job["state"] == "failed" and job.get("reason"):
        return None
    return f"{name}: {job['state']}" + (f" ({job['reason']})" if job.get("reason") else "")


def print_tables(faults: Iterable[str], record: Record, jobs: Mapping[str, dict[str, Any]], kinds: Mapping[str, JobKind],
                 starts: str, disk_full: bool, unsaved: list[str]) -> None:
    print("\nfaults by class (injected / skipped: no target at that moment)")
    for fault in sorted(faults):
        print(f"  {fault:<14} {record.injected[fault]:>3} / {record.skipped[fault]}")
    if not disk_full:
        print("  disk-full      not run (needs --disk-full, root and tmpfs; see the module docstring)")
    print("what the daemon did about them (from its events and status)")
    for what, n in sorted(record.outcomes.items()):
        print(f"  {what:<52} {n:>4}")
    if unsaved:
        print(f"  not on disk at a kill: {summary(unsaved)}")
    print(f"operator actions: {dict(record.heals)}; {starts}")
    print("jobs:")
    for name, kind in kinds.items():
        j = jobs.get(name, {})
        limit = f" (max_restarts {kind.max_restarts})" if kind.max_restarts else ""
        print(f"  {name:<9} {j.get('state', '?'):<10} attempts {j.get('attempt', 0):>3}  restarts {j.get('restarts', 0):>3}  "
              f"{kind.why}{limit}")
        if j.get("reason"):
            print(f"            {j['reason']}")


def summary(found: list[str], limit: int = 3) -> str:
    """The first few distinct violations (a clock prefix aside), and how many in all."""
    distinct: dict[str, str] = {}
    for what in found:
        distinct.setdefault(re.sub(r"^\d\d:\d\d:\d\d ", "", what), what)
    shown = list(distinct.values())[:limit]
    return "; ".join(shown) + (f" (+{len(found) - len(shown)} more)" if len(found) > len(shown) else "")


def print_invariants(rows: list[tuple[str, bool, str]]) -> None:
    print("\ninvariant                                     held  detail")
    for label, ok, detail in rows:
        print(f"{label:<45} {'yes' if ok else 'NO ':<5} {detail}")
