"""Node hooks: real subprocesses (this Python), filled-in argv, timeouts, coalescing."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from harness import wait_until
from gpuguard.actions.hooks import NodeHooks, short_hostname
from gpuguard.config import ConfigError, HooksConfig, load
from gpuguard.events import Event
from gpuguard.health.types import Severity

GPUS = [{"index": 0, "uuid": "GPU-aaaa"}, {"index": 3, "uuid": "GPU-dddd"}]
# a reason an attacker-controlled kernel line or exclude reason could carry
NASTY = """GPU 0 "fell" off; it's $(rm -rf /) `id` && echo pwned > /tmp/x {gpus} {{"""


class Recorder:
    """The daemon's record(): keeps the events (hooks.wait_idle orders the reads)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> Event:
        self.events.append(event)
        return event


def python(code: str, *args: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code, *args)


ARGV_TO_FILE = "import json, sys; open(sys.argv[1], 'w').write(json.dumps(sys.argv[2:]))"


def hooks_for(**fields: object) -> tuple[NodeHooks, Recorder]:
    recorder = Recorder()
    return NodeHooks(HooksConfig(**fields), recorder), recorder  # type: ignore[arg-type]


def test_unhealthy_hook_gets_filled_in_arguments_and_hostile_text_stays_one_argument(tmp_path: Path) -> None:
    out = tmp_path / "argv.json"
    template = python(ARGV_TO_FILE, str(out), "{hostname}", "reason={reason}", "{gpus}", "{uuids}", "{state}")
    hooks, recorder = hooks_for(on_unhealthy=template)
    hooks.on_unhealthy(NASTY, GPUS)
    assert hooks.wait_idle(10)
    assert json.loads(out.read_text()) == [short_hostname(), f"reason={NASTY}", "0,3", "GPU-aaaa,GPU-dddd", "unhealthy"]
    (event,) = recorder.events
    assert event.kind == "node_hook" and event.severity == Severity.INFO
    assert event.data["hook"] == "on_unhealthy" and event.data["exit_code"] == 0 and event.data["timed_out"] is False
    assert event.data["argv"][-4] == f"reason={NASTY}" and event.data["duration_s"] >= 0
    assert "on_unhealthy exited 0" in event.message


def test_recovered_hook_says_healthy(tmp_path: Path) -> None:
    out = tmp_path / "argv.json"
    hooks, recorder = hooks_for(on_recovered=python(ARGV_TO_FILE, str(out), "{state}", "{reason}", "{gpus}"))
    hooks.on_recovered("all 2 GPU(s) healthy", GPUS)
    assert hooks.wait_idle(10)
    assert json.loads(out.read_text()) == ["healthy", "all 2 GPU(s) healthy", "0,3"]
    assert recorder.events[0].data["hook"] == "on_recovered"


def test_an_empty_hook_does_nothing() -> None:
    hooks, recorder = hooks_for()
    hooks.on_unhealthy("GPU 0 faulted", GPUS)
    hooks.on_recovered("fine", GPUS)
    assert hooks.wait_idle(0) and recorder.events == []


def test_failure_is_recorded_with_exit_code_and_output_tail() -> None:
    hooks, recorder = hooks_for(on_unhealthy=python("import sys; print('scontrol: node not found'); sys.exit(3)"))
    hooks.on_unhealthy("x", GPUS)
    assert hooks.wait_idle(10)
    (event,) = recorder.events
    assert event.severity == Severity.ERROR and event.data["exit_code"] == 3
    assert "exited 3" in event.message and "scontrol: node not found" in event.message
    assert event.data["output_tail"] == "scontrol: node not found"


def test_a_missing_program_is_recorded_as_failed() -> None:
    hooks, recorder = hooks_for(on_unhealthy=("/nonexistent/gpuguard-hook", "{reason}"))
    hooks.on_unhealthy("x", GPUS)
    assert hooks.wait_idle(10)
    (event,) = recorder.events
    assert event.severity == Severity.ERROR and event.data["exit_code"] is None and "could not start" in event.message


def test_timeout_kills_the_hook_and_what_it_started() -> None:
    # the grandchild keeps the output pipe open: only a kill of the whole group ends the read at once
    code = (
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
        "print('started', flush=True); time.sleep(30)"
    )
    hooks, recorder = hooks_for(on_unhealthy=python(code), timeout_s=0.5)
    began = time.monotonic()
    hooks.on_unhealthy("x", GPUS)
    assert hooks.wait_idle(10)
    assert time.monotonic() - began < 2.0
    (event,) = recorder.events
    assert event.severity == Severity.ERROR and event.data["timed_out"] is True and event.data["exit_code"] is None
    assert "timed out after 0.5 s" in event.message and event.data["output_tail"] == "started"


def test_triggers_while_running_coalesce_into_one_more_run_with_the_newest_reason(tmp_path: Path) -> None:
    log, release = tmp_path / "runs.log", tmp_path / "release"
    code = (
        "import os, sys, time; "
        "open(sys.argv[1], 'a').write(sys.argv[3] + '\\n'); "
        "deadline = time.time() + 5\n"
        "while not os.path.exists(sys.argv[2]) and time.time() < deadline: time.sleep(0.01)"
    )
    hooks, recorder = hooks_for(on_unhealthy=python(code, str(log), str(release), "{reason}"))
    hooks.on_unhealthy("first", GPUS)
    wait_until(log.exists, 5, "the first hook running", 0.01)
    for reason in ("second", "third", "fourth"):
        hooks.on_unhealthy(reason, GPUS)
    release.touch()
    assert hooks.wait_idle(10)
    assert log.read_text().splitlines() == ["first", "fourth"]
    assert [e.severity for e in recorder.events] == [Severity.INFO, Severity.INFO]


def test_a_new_config_applies_to_the_next_trigger(tmp_path: Path) -> None:
    out = tmp_path / "argv.json"
    hooks, _ = hooks_for()
    hooks.config = HooksConfig(on_unhealthy=python(ARGV_TO_FILE, str(out), "{gpus}"))
    hooks.on_unhealthy("x", GPUS[:1])
    assert hooks.wait_idle(10)
    assert json.loads(out.read_text()) == ["0"]


# -- the [hooks] checks of the config loader


@pytest.mark.parametrize(
    ("toml", "key", "problem"),
    [
        ('[hooks]\non_unhealthy = ["notify", "{host}"]\n', "hooks.on_unhealthy[1]", "unknown placeholder {host}"),
        (
            '[hooks]\non_recovered = ["notify", "{uuid}"]\n',
            "hooks.on_recovered[1]",
            "allowed: {hostname}, {reason}, {gpus}, {uuids}, {state}",
        ),
        ('[hooks]\non_unhealthy = ["notify", "{reason"]\n', "hooks.on_unhealthy[1]", 'bad placeholder in "{reason"'),
        ('[hooks]\non_unhealthy = ["", "{reason}"]\n', "hooks.on_unhealthy", "must name a program"),
        ("[hooks]\ntimeout_s = 0\n", "hooks.timeout_s", "must be greater than 0"),
    ],
)
def test_bad_hooks_config_names_the_key(tmp_path: Path, toml: str, key: str, problem: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.key == key and problem in info.value.problem


def test_every_hook_placeholder_and_literal_braces_pass(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '[hooks]\non_unhealthy = ["scontrol", "update", "nodename={hostname}", "state=drain", '
        '"reason=gpuguard {state}: {reason} (GPUs {gpus}; {uuids}) {{x}}"]\n'
    )
    assert load(path).hooks.on_unhealthy[0] == "scontrol"
