"""Processes gpuguard did not start, on a faulted GPU, through a real gpuguardd
--simulate: only one that handles the checkpoint signal gets it; one without a
handler (SIGUSR1 would kill it) and one named in [jobs] foreign_never_signal
are left alone; every one gets an event naming it. The test signals nothing
itself and kills only the processes it started."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from harness import DaemonProc, running_daemon, wait_until

pytestmark = pytest.mark.e2e

AGENT = "gg-test-agent"  # the argv[0] of a process put on the never-signal list by a config reload


def handler_code(flag: Path) -> str:
    """A process that handles SIGUSR1 by writing `flag`, then says it is ready."""
    return (
        "import pathlib, signal, time\n"
        f"signal.signal(signal.SIGUSR1, lambda *a: pathlib.Path({str(flag)!r}).write_text('got SIGUSR1'))\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )


PLAIN = "import time\nprint('ready', flush=True)\ntime.sleep(120)\n"  # SIGUSR1 keeps its default action: death


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    """The processes a test starts; killed afterwards (the test signals nothing else)."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


def start(procs: list[subprocess.Popen[str]], code: str, argv0: str | None = None) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [argv0 or sys.executable, "-c", code], executable=sys.executable, stdout=subprocess.PIPE, text=True
    )
    procs.append(proc)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"  # its handler, if any, is in place
    return proc


def about(d: DaemonProc, pid: int) -> dict[str, Any] | None:
    """The one event on a foreign holder with this pid, once it is there."""
    found = [e for e in d.events() if e.get("pid") == pid and e["kind"] in ("checkpoint_requested", "foreign_not_signalled")]
    assert len(found) <= 1, found
    return found[0] if found else None


def test_only_a_foreign_holder_that_handles_the_signal_gets_it(tmp_path: Path, procs: list[subprocess.Popen[str]]) -> None:
    with running_daemon(tmp_path, gpus=2, extra_config='[jobs]\nforeign_never_signal = ["nv-hostengine"]\n') as d:
        # the list is live: a reload (SIGHUP) adds the agent's name before the fault
        d.config.write_text(d.config.read_text().replace('["nv-hostengine"]', f'["nv-hostengine", "{AGENT}"]'))
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "config_reloaded" in d.log.read_text(), 30, "the config reload")

        got, agent_got = tmp_path / "handler-got", tmp_path / "agent-got"
        handler = start(procs, handler_code(got))
        plain = start(procs, PLAIN)
        agent = start(procs, handler_code(agent_got), argv0=f"/opt/monitoring/{AGENT}")
        pids = [handler.pid, plain.pid, agent.pid]
        for pid in pids:
            d.ctl("inject", "0", "attach", str(pid))
        d.wait_for(
            lambda s: sorted(p["pid"] for p in s["gpus"][0]["processes"]) == sorted(pids),
            what="the three processes listed on GPU 0",
        )

        d.ctl("inject", "0", "xid", "95")
        d.wait_for(lambda s: s["gpus"][0]["state"] in ("faulted", "excluded"), what="GPU 0 faulted")
        signalled = wait_until(lambda: about(d, handler.pid), 10, "the event on the process with a handler")
        left = wait_until(lambda: about(d, plain.pid), 10, "the event on the process without a handler")
        listed = wait_until(lambda: about(d, agent.pid), 10, "the event on the listed process")

        # the one with a handler got the signal, handled it, and runs on
        wait_until(got.exists, 30, "the handler's file")
        assert got.read_text() == "got SIGUSR1" and handler.poll() is None
        name = psutil.Process(handler.pid).name()
        assert signalled["kind"] == "checkpoint_requested" and signalled["signalled"] is True
        assert signalled["process"] == name and signalled["gpu"] == d.gpu(0)["uuid"]
        assert signalled["message"] == (
            f"pid {handler.pid} ({name}, not a gpuguard job) holds faulted GPU 0: "
            "sent SIGUSR1, which it handles; it is not restarted"
        )

        # the one without a handler was not signalled: SIGUSR1 would have killed it
        assert plain.poll() is None
        name = psutil.Process(plain.pid).name()
        assert left["kind"] == "foreign_not_signalled" and left["signalled"] is False and left["process"] == name
        assert left["message"] == (
            f"pid {plain.pid} ({name}, not a gpuguard job) holds faulted GPU 0: not signalled: "
            "it does not handle SIGUSR1, which would kill it; it is not restarted"
        )

        # the listed one has a handler but is on foreign_never_signal: left alone
        assert agent.poll() is None and not agent_got.exists()
        assert listed["kind"] == "foreign_not_signalled" and listed["signalled"] is False
        assert f"pid {agent.pid} ({psutil.Process(agent.pid).name()}, not a gpuguard job)" in listed["message"]
        assert f"not signalled: {AGENT} is on [jobs] foreign_never_signal; it is not restarted" in listed["message"]

        # once each: later ticks on the still-faulted GPU add nothing (about() asserts one at most)
        seen = d.status()["daemon"]["last_poll_at"]
        d.wait_for(lambda s: s["daemon"]["last_poll_at"] > seen + 0.5, what="a few more polls")
        assert all(about(d, pid) for pid in pids)
        assert handler.poll() is None and plain.poll() is None and agent.poll() is None


def test_a_foreign_holder_is_asked_again_when_its_gpu_faults_again(tmp_path: Path, procs: list[subprocess.Popen[str]]) -> None:
    """Once per fault, not once ever: after a reset the same long-lived process gets the next request too."""
    got = tmp_path / "got"
    code = (
        "import signal, time\n"
        f"signal.signal(signal.SIGUSR1, lambda *a: open({str(got)!r}, 'a').write('SIGUSR1\\n'))\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    with running_daemon(tmp_path, gpus=1) as d:
        holder = start(procs, code)
        for round_ in (1, 2):
            d.ctl("inject", "0", "attach", str(holder.pid))
            d.wait_for(lambda s: [p["pid"] for p in s["gpus"][0]["processes"]] == [holder.pid], what="the holder listed")
            d.ctl("inject", "0", "xid", "95")
            wait_until(lambda: got.exists() and len(got.read_text().splitlines()) == round_, 10, f"signal {round_}")
            d.ctl("inject", "0", "detach", str(holder.pid))  # nothing may hold a GPU being reset
            d.ctl("reset", "0")
            d.wait_for(lambda s: s["gpus"][0]["state"] == "healthy", 30, "GPU 0 healthy after its reset")  # a reset and probation on a loaded machine
        asked = [e for e in d.events("checkpoint_requested") if e.get("pid") == holder.pid]
        assert len(asked) == 2 and holder.poll() is None
