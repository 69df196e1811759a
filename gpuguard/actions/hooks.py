"""Node hooks: the operator's commands for "this node turned unhealthy" and
"it recovered" (drain it in Slurm, page someone, label the node).

A hook is an argv template from the config, filled in and run by
`actions/argv.py`: never through a shell, so text from a fault (an Xid
message, an operator's exclude reason) only ever becomes one whole argument.
Hooks run on their own thread under a timeout: a slow `scontrol` must not
hold up health checks. Each run is recorded as one `node_hook` event.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog

from gpuguard.actions.argv import ArgvRun, fill_argv, run_argv, short_hostname
from gpuguard.config import HooksConfig
from gpuguard.events import Event, EventKind
from gpuguard.health.types import Severity

log = structlog.get_logger("gpuguard.hooks")

__all__ = ["NodeHooks", "short_hostname"]


class _HookRunner:
    """One hook's runs, one at a time. A trigger while one runs is kept (the
    newest wins) and run once after it, so a burst of faults runs the hook at
    most twice and the last run sees the newest reason."""

    def __init__(self, name: str, timeout_s: Callable[[], float], record: Callable[[Event], Any]) -> None:
        self.name = name
        self._timeout_s = timeout_s
        self._record = record
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._pending: list[str] | None = None

    def trigger(self, argv: list[str]) -> None:
        with self._lock:
            if not self._idle.is_set():
                self._pending = argv
                return
            self._idle.clear()
        threading.Thread(target=self._loop, args=(argv,), name=f"hook-{self.name}", daemon=True).start()

    def wait_idle(self, timeout_s: float | None) -> bool:
        return self._idle.wait(timeout_s)

    def _loop(self, argv: list[str]) -> None:
        next_argv: list[str] | None = argv
        while next_argv is not None:
            event = self._run(next_argv)
            try:
                self._record(event)
            except Exception as exc:  # a store error must not wedge the hook
                log.error("node_hook_record_failed", hook=self.name, error=str(exc), message=event.message)
            with self._lock:
                next_argv, self._pending = self._pending, None
                if next_argv is None:
                    self._idle.set()

    def _run(self, argv: list[str]) -> Event:
        return self._event(run_argv(argv, self._timeout_s()))

    def _event(self, run: ArgvRun) -> Event:
        message = f"node hook {self.name} {run.outcome} ({run.duration_s:.1f} s)" + (f": {run.output_tail}" if run.output_tail else "")
        return Event(
            kind=EventKind.NODE_HOOK,
            severity=Severity.INFO if run.ok else Severity.ERROR,
            message=message,
            data={
                "hook": self.name,
                "argv": list(run.argv),
                "exit_code": run.exit_code,
                "duration_s": round(run.duration_s, 3),
                "timed_out": run.timed_out,
                "output_tail": run.output_tail,
            },
        )


class NodeHooks:
    """Runs [hooks] on_unhealthy / on_recovered. `config` may be replaced on a
    reload; the next trigger uses the new templates and timeout."""

    def __init__(self, config: HooksConfig, record: Callable[[Event], Any]) -> None:
        self.config = config
        self._runners = {
            name: _HookRunner(name, lambda: self.config.timeout_s, record) for name in ("on_unhealthy", "on_recovered")
        }

    def on_unhealthy(self, reason: str, gpus: Sequence[Mapping[str, Any]]) -> None:
        """The node is not fit for work; `gpus` are the GPUs that make it so."""
        self._trigger("on_unhealthy", "unhealthy", reason, gpus)

    def on_recovered(self, reason: str, gpus: Sequence[Mapping[str, Any]]) -> None:
        """Every GPU is fit for work again; `gpus` are the node's GPUs."""
        self._trigger("on_recovered", "healthy", reason, gpus)

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Wait for running hooks (and their queued reruns) to finish; False on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for runner in self._runners.values():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not runner.wait_idle(left):
                return False
        return True

    def _trigger(self, name: str, state: str, reason: str, gpus: Sequence[Mapping[str, Any]]) -> None:
        template: tuple[str, ...] = getattr(self.config, name)
        if not template:
            return
        values = {
            "hostname": short_hostname(),
            "reason": reason,
            "gpus": ",".join(str(gpu["index"]) for gpu in gpus),
            "uuids": ",".join(str(gpu["uuid"]) for gpu in gpus),
            "state": state,
        }
        self._runners[name].trigger(fill_argv(template, values))
