"""More of the supervisor through a real gpuguardd: snapshots and rollback,
[[job]] from the config as its user, a minimum GPU count, migration off a
degraded GPU, and SIGHUP reloading the health thresholds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import NOBODY, DaemonProc, running_daemon, wait_until

from .jobs.trainer import read_step
from .trainer_runs import FAST, TRAINER, run_trainer, running_attempt

pytestmark = pytest.mark.e2e


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProc]:
    with running_daemon(tmp_path, extra_config=FAST) as d:
        yield d
        d.ctl("stop", "j", check=False)  # jobs outlive their daemon by design
        wait_until(lambda: (j := d.find_job("j")) is None or j["pid"] is None, 15, "job j ended")


def frozen_with_snapshots(daemon: DaemonProc, work: Path, count: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run the trainer until it has `count` snapshots, then SIGSTOP it so the list holds still."""
    run_trainer(daemon, "j", work, "--every", "3", "--step-s", "0.1")
    first = running_attempt(daemon, "j", work)
    wait_until(lambda: len(list_snapshots(daemon)) >= count, 20, f"{count} snapshots")
    os.kill(first["pid"], signal.SIGSTOP)  # our own trainer: no more checkpoints from here on
    previous: list[dict[str, Any]] = []

    def settled() -> list[dict[str, Any]] | None:
        nonlocal previous
        now, previous = previous, list_snapshots(daemon)
        return previous if now == previous else None

    return first, wait_until(settled, 10, "the snapshot list to settle", interval=0.5)


def list_snapshots(daemon: DaemonProc) -> list[dict[str, Any]]:
    return json.loads(daemon.ctl("snapshots", "j", "--json").stdout)


def test_snapshots_and_rollback_to_the_one_before_newest(daemon: DaemonProc, tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    _, snaps = frozen_with_snapshots(daemon, work, 3)
    target = snaps[1]  # newest first: the one before the newest
    daemon.ctl("rollback", "j")
    second = running_attempt(daemon, "j", work, attempt=2)
    assert second["env"]["GPUGUARD_RESUME_FROM"] == target["path"]
    assert second["start_step"] == read_step(Path(target["path"]))
    assert second["start_step"] < read_step(Path(snaps[0]["path"]))
    missing = daemon.ctl("rollback", "j", "no-such-snapshot", check=False)
    assert missing.returncode == 1 and "no snapshot" in missing.stderr


def test_rollback_holds_against_the_checkpoint_the_old_attempt_saves_on_sigterm(daemon: DaemonProc, tmp_path: Path) -> None:
    """Many trainers save on SIGTERM: that checkpoint, newer than the snapshot asked for, must not win."""
    work = tmp_path / "w"
    work.mkdir()
    run_trainer(daemon, "j", work, "--every", "3", "--step-s", "0.1", "--save-on-term")
    running_attempt(daemon, "j", work)
    snaps = wait_until(lambda: (s := list_snapshots(daemon)) and len(s) >= 2 and s, 20, "two snapshots")
    target = snaps[1]
    daemon.ctl("rollback", "j", target["id"])
    second = running_attempt(daemon, "j", work, attempt=2)
    assert second["env"]["GPUGUARD_RESUME_FROM"] == target["path"]
    assert second["start_step"] == read_step(Path(target["path"]))


def test_min_gpus_starts_on_fewer_gpus(daemon: DaemonProc, tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    daemon.ctl("exclude", "1")
    daemon.ctl("run", "--name", "j", "--gpus", "2", "--min-gpus", "1", "--workdir", str(work), "--",
               sys.executable, str(TRAINER))  # fmt: skip
    first = running_attempt(daemon, "j", work)
    assert first["env"]["CUDA_VISIBLE_DEVICES"] == daemon.gpu(0)["uuid"]


def test_degraded_gpu_job_migrates_when_another_is_free(daemon: DaemonProc, tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    run_trainer(daemon, "j", work)
    first = running_attempt(daemon, "j", work)
    gpu0 = daemon.gpu(0)["uuid"]
    assert first["env"]["CUDA_VISIBLE_DEVICES"] == gpu0
    daemon.ctl("inject", "0", "thermal", "89")  # degraded, not faulted
    second = running_attempt(daemon, "j", work, attempt=2)
    assert second["env"]["CUDA_VISIBLE_DEVICES"] == daemon.gpu(1)["uuid"]
    assert second["start_step"] > 0  # it checkpointed at its own pace and resumed
    assert daemon.gpu(0)["state"] == "degraded"  # moved off, not excluded


@pytest.mark.root
def test_config_job_starts_as_its_user(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("python3", path="/usr/bin") is None:
        pytest.skip("needs root and /usr/bin/python3")
    shared = Path(tempfile.mkdtemp(prefix="gg-cfgjob-", dir="/tmp"))
    shared.chmod(0o777)
    try:
        out = shared / "uid"
        extra = (
            "[[job]]\n"
            'name = "cfg"\n'
            f'command = ["/usr/bin/python3", "-c", "import os; open({str(out)!r}, \'w\').write(str(os.getuid()))"]\n'
            'user = "nobody"\n'
            f'workdir = "{shared}"\n'
        )
        with running_daemon(tmp_path, extra_config=extra) as d:
            wait_until(lambda: d.job("cfg")["state"] == "succeeded", 15, "the config job to finish")
            assert out.read_text() == str(NOBODY.pw_uid)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_sighup_reloads_health_thresholds(tmp_path: Path) -> None:
    with running_daemon(tmp_path) as d:
        d.ctl("inject", "0", "thermal", "80")
        d.wait_for(lambda s: s["gpus"][0]["temperature_c"] == 80, what="80 C")
        assert d.gpu(0)["state"] == "healthy"
        d.config.write_text(d.config.read_text() + "[health]\ntemperature_degraded_c = 75\n")
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for(lambda s: s["gpus"][0]["state"] == "degraded", what="degraded after the reload")
        assert "config_reloaded" in d.log.read_text()
        d.config.write_text(d.config.read_text() + "[health]\nbroken = 1\n")  # a bad edit
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "config_reload_failed" in d.log.read_text(), 10, "the bad reload refused")
        d.polls_after(time.time())  # evaluations since the refusal
        assert d.proc.poll() is None and d.gpu(0)["state"] == "degraded"  # still running, old config kept
