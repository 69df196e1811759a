"""What the changing commands (exclude, include, reset, inject, run, stop,
rollback) say when they are done: one or two sentences from the daemon's
reply. `--json` prints the reply itself instead (see `output`)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from gpuguard.ctl.reasons import explain
from gpuguard.ctl.tables import plural, short_uuid

Reply = dict[str, Any]
_GPU_PREFIX = re.compile(r"GPU \d+: ")


def _gpu(r: Reply) -> str:
    """`GPU 1 (GPU-25066fda)`, or what of it the reply holds."""
    uuid = short_uuid(r.get("gpu"))
    if r.get("index") is None:
        return uuid or "the GPU"
    return f"GPU {r['index']} ({uuid})" if uuid else f"GPU {r['index']}"


def _period(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def exclude(r: Reply) -> str:
    where = f" until `gpuguardctl include {r['index']}`" if r.get("index") is not None else " until it is included"
    return f"{_gpu(r)} is excluded: {_period(str(r.get('reason') or 'excluded by operator'))} It stays out of service{where}."


def include(r: Reply) -> str:
    if r.get("changed", True):
        head = f"{_gpu(r)} is back in service: its exclusion, Xids, hang suspicion and probation are forgotten."
    else:
        head = f"{_gpu(r)} was not excluded and nothing was held against it."
    state = r.get("state")
    if not state or state == "healthy":
        return f"{head} It is healthy." if state else head
    why = explain({"state": state, "reason": r.get("reason")})
    return f"{head} It is {state}: {why}"


def reset(r: Reply) -> str:
    detail = r.get("detail")
    return f"{_gpu(r)} was reset." + (f" The reset said: {_period(str(detail))}" if detail else "")


def inject(r: Reply) -> str:
    what = _GPU_PREFIX.sub("", str(r.get("injected") or "done"), count=1)
    return f"{_gpu(r)}: {_period(what)}"


def run(r: Reply) -> str:
    name, state = r.get("name"), r.get("state")
    if state == "waiting":
        return f"Job {name} is waiting: no healthy GPU can take it now. It starts when one can."
    gpus = ", ".join(str(short_uuid(u)) for u in r.get("gpus") or [])
    detail = [f"pid {r['pid']}"] if r.get("pid") else []
    if r.get("attempt"):
        detail.append(f"attempt {r['attempt']}")
    where = f" on {gpus}" if gpus else ""
    more = f" ({', '.join(detail)})" if detail else ""
    return f"Job {name} is {state}{where}{more}. Its output: gpuguardctl logs {name}"


def stop(r: Reply) -> str:
    name, state = r.get("name"), r.get("state")
    if state == "stopping":
        return f"Job {name} is stopping; its GPUs are freed once it and everything it started have exited."
    return f"Job {name} is {state}."


def rollback(r: Reply) -> str:
    snapshot = r.get("snapshot")
    where = f" ({r['path']})" if r.get("path") else ""
    now = f"; it is {r['state']} now" if r.get("state") else ""
    return f"Job {r.get('name')} goes back to snapshot {snapshot}{where}{now}."


def ended(job: Reply) -> str:
    """How a job `run --wait` waited for ended well."""
    attempts, restarts = job.get("attempt") or 1, job.get("restarts") or 0
    return f"Job {job.get('name')} {job.get('state')} after {plural(attempts, 'attempt')} and {plural(restarts, 'restart')}."


SENTENCES: dict[str, Callable[[Reply], str]] = {
    "exclude": exclude,
    "include": include,
    "reset": reset,
    "inject": inject,
    "run": run,
    "stop": stop,
    "rollback": rollback,
}
