"""Issue #17 item 1 (d): every option and every inject fault in --help, the
checkpoint handshake and the GPUGUARD_* variables in `run --help`, and
`check`'s exit codes as `check --help` states them, proven against a real
`gpuguardd --simulate 2` through the real `gpuguardctl`."""

from __future__ import annotations

import argparse
import re
import signal
import subprocess

import pytest

from harness import BIN, DaemonProc
from gpuguard import contract
from gpuguard.ctl.completion import every_action
from gpuguard.ctl.parser import build_parser
from gpuguard.sim.faults import USAGE

CTL = str(BIN / "gpuguardctl")


def help_of(*command: str) -> str:
    """`gpuguardctl COMMAND --help`, its words joined by single spaces."""
    done = subprocess.run([CTL, *command, "--help"], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stderr) == (0, ""), command
    return " ".join(done.stdout.split())


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_option_and_argument_has_its_help() -> None:
    silent = [
        f"{' '.join(a.option_strings) or a.dest}"
        for a in every_action(build_parser())
        if not isinstance(a, argparse._SubParsersAction) and not (a.help and a.help.strip())
    ]
    assert silent == []
    for command, parser in _commands().items():
        text = help_of(command)
        for action in parser._actions:
            shown = action.option_strings[-1] if action.option_strings else str(action.metavar or action.dest)
            assert shown.split(" ")[0].strip("{") in text, (command, shown)
            assert " ".join(str(action.help).split())[:40] in text, (command, action.help)


def test_inject_help_lists_every_fault_the_simulator_takes() -> None:
    text = help_of("inject")
    taken = [re.sub(r" \(default \d+\)", "", f) for f in USAGE.split(", ")]
    assert taken == ["xid CODE", "ecc-dbe", "ecc-sbe COUNT", "hang", "lost", "remap-pending", "thermal CELSIUS",
                     "nvml-hang [SECONDS]", "clear", "attach PID", "detach PID"]  # fmt: skip
    for fault in taken:
        assert f" {fault} " in text, fault


def test_run_help_explains_name_restarts_handshake_and_variables() -> None:
    text = help_of("run")
    assert "--name NAME the job's name: letters, digits" in text
    assert "--max-restarts N give up (job failed) after N crash restarts" in text
    assert "The checkpoint handshake:" in text and "Exit 75 (EX_TEMPFAIL)" in text and "SIGKILL" in text
    variables = [v for k, v in vars(contract).items() if k.startswith("ENV_") and k not in ("ENV_PREFIX", "ENV_SOCKET")]
    assert len(variables) == 10
    for name in [*variables, "CUDA_VISIBLE_DEVICES"]:
        assert f" {name} " in text, name


@pytest.mark.e2e
def test_check_exits_as_its_help_says(daemon: DaemonProc) -> None:  # noqa: F811
    text = help_of("check")
    assert "Exit status: 0 every GPU is healthy" in text
    assert "1 a GPU is unhealthy: faulted, excluded, resetting or unknown (an unknown GPU gives 1)" in text
    assert "2 the state is unknown: the daemon is unreachable" in text

    def check() -> tuple[int, str]:
        done = daemon.ctl("check", check=False)
        assert done.stdout.count("\n") == 1 and done.stderr == ""
        return done.returncode, done.stdout

    assert check() == (0, "gpuguard: all 2 GPU(s) healthy\n")
    daemon.ctl("inject", "0", "nvml-hang", "30")
    daemon.wait_for(lambda s: s["gpus"][0]["state"] == "unknown", what="GPU 0 unknown")
    code, line = check()
    assert code == 1 and "GPU 0" in line and "unknown" in line
    daemon.ctl("exclude", "1")
    assert check()[0] == 1
    daemon.stop(signal.SIGTERM)
    code, line = check()
    assert code == 2 and line.startswith("gpuguard: unknown:") and str(daemon.socket) in line


@pytest.mark.parametrize("command", ["status", "exclude", "run", "inject", "check"])
def test_help_needs_no_daemon(command: str) -> None:
    done = subprocess.run([CTL, "--socket", "/nonexistent.sock", command, "--help"], capture_output=True, timeout=30)
    assert done.returncode == 0 and done.stdout.startswith(f"usage: gpuguardctl {command}".encode())
