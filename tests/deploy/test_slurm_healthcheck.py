"""deploy/slurm-healthcheck.sh, run as slurmd runs it (no arguments, by its #!/bin/sh) against
a real `gpuguardd --simulate 2`, with a fake `scontrol` of the test's own first on PATH that
records its argv and exits as told. The real scontrol this machine may have is never run."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness import BIN, REPO, DaemonProc, wait_until

SCRIPT = REPO / "deploy" / "slurm-healthcheck.sh"

FAKE_SCONTROL = """#!{python}
import json, os, sys
with open(os.environ["FAKE_SCONTROL_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
if os.environ.get("FAKE_SCONTROL_MESSAGE"):
    print(os.environ["FAKE_SCONTROL_MESSAGE"], file=sys.stderr)
sys.exit(int(os.environ.get("FAKE_SCONTROL_RC", "0")))
"""


class Slurm:
    """The script's world: a PATH whose `scontrol` is the fake, and the calls it recorded."""

    def __init__(self, tmp: Path) -> None:
        self.bin = tmp / "fakebin"
        self.bin.mkdir()
        fake = self.bin / "scontrol"
        fake.write_text(FAKE_SCONTROL.format(python=sys.executable))
        fake.chmod(0o755)
        self.log = tmp / "scontrol.calls"

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def healthcheck(self, socket: Path, scontrol_rc: int = 0, **env: str) -> subprocess.CompletedProcess[str]:
        """The script as slurmd starts it: no arguments, a plain environment (PATH, the
        socket's variable for gpuguardctl, and what the test adds)."""
        environ = {
            "PATH": f"{self.bin}:/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "GPUGUARDCTL": str(BIN / "gpuguardctl"),
            "GPUGUARD_SOCKET": str(socket),
            "FAKE_SCONTROL_LOG": str(self.log),
            "FAKE_SCONTROL_RC": str(scontrol_rc),
            **env,
        }
        return subprocess.run([str(SCRIPT)], env=environ, capture_output=True, text=True, timeout=60)


@pytest.fixture
def slurm(tmp_path: Path) -> Slurm:
    return Slurm(tmp_path)


def short_hostname() -> str:
    return subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()


def check_exit(daemon: DaemonProc) -> int:
    return daemon.ctl("check", check=False).returncode


def drain_reason(call: list[str], node: str) -> str:
    """The Reason= of a drain call, after checking the call is exactly a drain of `node`."""
    assert call[:3] == ["update", f"NodeName={node}", "State=DRAIN"], call
    assert len(call) == 4 and call[3].startswith("Reason="), call
    return call[3].removeprefix("Reason=")


def gpu_uuid(daemon: DaemonProc, index: int) -> Any:
    return daemon.gpu(index)["uuid"]


def test_the_script_is_executable_posix_sh_and_clean() -> None:
    assert os.access(SCRIPT, os.X_OK), "slurm.conf names it as a program: it must be executable"
    assert SCRIPT.read_text().startswith("#!/bin/sh\n")
    subprocess.run(["sh", "-n", str(SCRIPT)], check=True, timeout=30)
    if shutil.which("shellcheck"):
        done = subprocess.run(["shellcheck", "-s", "sh", str(SCRIPT)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout


@pytest.mark.e2e
def test_a_healthy_node_is_not_drained(daemon: DaemonProc, slurm: Slurm) -> None:
    done = slurm.healthcheck(daemon.socket)
    assert done.returncode == 0, done.stderr
    assert slurm.calls() == []


@pytest.mark.e2e
def test_a_faulted_gpu_drains_the_node_with_a_reason_naming_it(daemon: DaemonProc, slurm: Slurm) -> None:
    uuid = gpu_uuid(daemon, 0)
    daemon.ctl("inject", "0", "xid", "79")
    wait_until(lambda: check_exit(daemon) == 1, 10, "gpuguardctl check to call the node unhealthy")
    done = slurm.healthcheck(daemon.socket)
    assert done.returncode == 0, done.stderr
    (call,) = slurm.calls()
    reason = drain_reason(call, short_hostname())
    assert reason.startswith("gpuguard: GPU 0 (") and uuid in reason and "faulted" in reason, reason
    assert "Xid 79" in reason or "lost" in reason, reason
    assert "\n" not in reason and len(reason) <= 200


@pytest.mark.e2e
def test_an_excluded_gpu_drains_with_the_operators_reason(daemon: DaemonProc, slurm: Slurm) -> None:
    uuid = gpu_uuid(daemon, 1)
    daemon.ctl("exclude", "1", "--reason", "fan rattles " + "x" * 300)
    wait_until(lambda: check_exit(daemon) == 1, 10, "gpuguardctl check to call the node unhealthy")
    done = slurm.healthcheck(daemon.socket, SLURMD_NODENAME="gpu-node-07")
    assert done.returncode == 0, done.stderr
    (call,) = slurm.calls()
    # slurmd hands the program its NodeName (SLURMD_NODENAME), which wins over the hostname
    reason = drain_reason(call, "gpu-node-07")
    assert "GPU 1" in reason and uuid[:12] in reason, reason
    assert len(reason) == 200 and "\n" not in reason  # a Slurm reason is one short line


def test_an_unreachable_daemon_drains_the_node(tmp_path: Path, slurm: Slurm) -> None:
    """Documented: exit 2 of `gpuguardctl check` (cannot reach the daemon) drains too."""
    socket = tmp_path / "nobody-listens.sock"
    done = slurm.healthcheck(socket)
    assert done.returncode == 0, done.stderr
    (call,) = slurm.calls()
    reason = drain_reason(call, short_hostname())
    assert reason.startswith("gpuguard unreachable: ") and str(socket) in reason, reason


@pytest.mark.e2e
def test_a_daemon_that_stopped_drains_the_node(daemon: DaemonProc, slurm: Slurm) -> None:
    assert slurm.healthcheck(daemon.socket).returncode == 0 and slurm.calls() == []
    daemon.stop()
    done = slurm.healthcheck(daemon.socket)
    assert done.returncode == 0, done.stderr
    (call,) = slurm.calls()
    assert drain_reason(call, short_hostname()).startswith("gpuguard unreachable: ")


def test_a_missing_gpuguardctl_drains_as_unreachable(tmp_path: Path, slurm: Slurm) -> None:
    done = slurm.healthcheck(tmp_path / "sock", GPUGUARDCTL=str(tmp_path / "no-such-gpuguardctl"))
    assert done.returncode == 0, done.stderr
    (call,) = slurm.calls()
    assert drain_reason(call, short_hostname()).startswith("gpuguard unreachable: ")


def test_a_failing_scontrol_is_the_scripts_exit_status(tmp_path: Path, slurm: Slurm) -> None:
    """Documented: scontrol's own exit status when the drain failed, its message on stderr
    (slurmd logs both)."""
    done = slurm.healthcheck(
        tmp_path / "sock", scontrol_rc=1, FAKE_SCONTROL_MESSAGE="slurm_update error: Invalid node name specified"
    )
    assert done.returncode == 1
    assert "Invalid node name specified" in done.stderr
    assert len(slurm.calls()) == 1


def test_no_scontrol_at_all_exits_127(tmp_path: Path, slurm: Slurm) -> None:
    done = slurm.healthcheck(tmp_path / "sock", SCONTROL=str(tmp_path / "no-such-scontrol"))
    assert done.returncode == 127, (done.returncode, done.stderr)
    assert slurm.calls() == []


def test_the_installed_path_is_the_one_slurm_conf_example_names() -> None:
    example = (REPO / "deploy" / "slurm.conf.example").read_text()
    (line,) = [x for x in example.splitlines() if x.startswith("HealthCheckProgram=")]
    program = line.split("=", 1)[1]
    assert shlex.split(program) == [program], "HealthCheckProgram takes a path without arguments"
    assert f"install -m 0755 deploy/slurm-healthcheck.sh {program}" in SCRIPT.read_text()
    assert f"install -m 0755 deploy/slurm-healthcheck.sh {program}" in (REPO / "docs" / "DEPLOY.md").read_text()
