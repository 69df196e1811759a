"""Files and permissions: the daemon refuses a state dir or a config that
others can change and a socket path that is a symlink, and never follows a
job's checkpoint symlink out of its workdir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import BIN, running_daemon
from gpuguard.config import ConfigError, load
from supervisor.jobs.trainer import save_atomic

pytestmark = pytest.mark.e2e

TRAINER = Path(__file__).parent.parent / "supervisor" / "jobs" / "trainer.py"
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")


def gpuguardd(tmp: Path, config: Path, *, state_dir: Path | None = None, socket: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run gpuguardd --simulate 1 to its exit (these all refuse to start)."""
    (tmp / "run").mkdir(exist_ok=True)
    return subprocess.run(
        [str(BIN / "gpuguardd"), "--simulate", "1", "--config", str(config),
         "--state-dir", str(state_dir or tmp / "state"), "--socket", str(socket or tmp / "run" / "gpuguard.sock")],
        capture_output=True, text=True, timeout=30,
    )


def config_file(directory: Path, mode: int = 0o644) -> Path:
    path = directory / "config.toml"
    path.write_text("[monitor]\npoll_interval_s = 0.2\n")
    path.chmod(mode)
    return path


# ---------------------------------------------------------------- state dir


@pytest.mark.parametrize("mode", [0o777, 0o1777])
def test_a_state_dir_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    """Sticky or not: the daemon creates files there by name (regression: 1777 used to pass)."""
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(mode)
    done = gpuguardd(tmp_path, config_file(tmp_path), state_dir=state)
    assert done.returncode == 2, done.stderr
    assert f"daemon.state_dir: {state} is writable by every user" in done.stderr
    assert not (state / "gpuguard.db").exists()


@needs_root
@pytest.mark.root
def test_a_state_dir_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, NOBODY, NOBODY)
    done = gpuguardd(tmp_path, config_file(tmp_path), state_dir=state)
    assert done.returncode == 2 and f"{state} is owned by uid {NOBODY}" in done.stderr, done.stderr


# ---------------------------------------------------------------- config file


def test_a_world_writable_config_is_refused_by_the_daemon(tmp_path: Path) -> None:
    config = config_file(tmp_path, 0o666)
    done = gpuguardd(tmp_path, config)
    assert done.returncode == 2
    assert f"{config}: refusing a config that others can change: writable by every user (mode 0666)" in done.stderr


@needs_root
@pytest.mark.parametrize(
    ("owner", "mode", "fragment"),
    [
        ((NOBODY, 0), 0o644, f"owned by uid {NOBODY}"),
        ((0, NOBODY), 0o664, f"writable by group {NOBODY}"),
    ],
)
@pytest.mark.root
def test_a_config_others_can_change_is_refused(tmp_path: Path, owner: tuple[int, int], mode: int, fragment: str) -> None:
    config = config_file(tmp_path, mode)
    os.chown(config, *owner)
    with pytest.raises(ConfigError) as caught:
        load(config)
    assert str(config) in str(caught.value) and fragment in str(caught.value)


def test_a_config_in_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "etc"
    directory.mkdir()
    config = config_file(directory)
    directory.chmod(0o777)
    with pytest.raises(ConfigError, match=f"its directory {directory} is writable by every user"):
        load(config)


def test_sane_configs_load(tmp_path: Path) -> None:
    """0644 or 0600 files; the group may write when it is root's or ours; a sticky /tmp-like directory."""
    for mode in (0o600, 0o644, 0o640, 0o664):
        assert load(config_file(tmp_path, mode)).monitor.poll_interval_s == 0.2
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    config = config_file(sticky)
    sticky.chmod(0o1777)
    assert load(config).source == config


# ---------------------------------------------------------------- socket


def test_a_socket_path_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("not yours")
    (tmp_path / "run").mkdir()
    link = tmp_path / "run" / "gpuguard.sock"
    link.symlink_to(target)
    done = gpuguardd(tmp_path, config_file(tmp_path), socket=link)
    assert done.returncode != 0
    assert f"{link} exists and is a symlink; refusing to replace it" in done.stdout + done.stderr
    assert link.is_symlink() and target.read_text() == "not yours"


def test_a_socket_directory_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    """Regression: the jobs' runtime dir was created through the symlink before the socket was refused."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "link").symlink_to(real)
    done = gpuguardd(tmp_path, config_file(tmp_path), socket=tmp_path / "run" / "link" / "gpuguard.sock")
    assert done.returncode != 0
    assert "the socket's directory is a symlink" in done.stdout + done.stderr
    assert list(real.iterdir()) == []


# ---------------------------------------------------------------- job checkpoints


def test_a_checkpoint_symlink_out_of_the_workdir_is_never_followed(tmp_path: Path) -> None:
    """Two jobs: one whose checkpoint file is a symlink to a file outside its
    workdir, one whose checkpoint sits in a symlinked directory outside it.
    Neither gets a snapshot; both get snapshot_rejected."""
    outside = tmp_path / "outside"
    outside.mkdir()
    save_atomic(outside / "secret.pt", 99)  # a valid checkpoint the job must not be able to plant
    with running_daemon(tmp_path, gpus=2, extra_config="[jobs]\ncheckpoint_grace_s = 2.0\nstop_timeout_s = 0.5\n") as d:
        file_link = tmp_path / "w1"
        file_link.mkdir()
        (file_link / "ck.pt").symlink_to(outside / "secret.pt")
        dir_link = tmp_path / "w2"
        dir_link.mkdir()
        (dir_link / "sub").symlink_to(outside)
        for name, workdir, checkpoint, trainer_ck in (
            ("filelink", file_link, "ck.pt", str(outside / "secret.pt")),
            ("dirlink", dir_link, "sub/ck.pt", "sub/ck.pt"),
        ):
            d.ctl("run", "--name", name, "--checkpoint", checkpoint, "--workdir", str(workdir), "--",
                  sys.executable, str(TRAINER), "--checkpoint", trainer_ck, "--every", "2", "--step-s", "0.02",
                  "--finish-after", "10")
        d.wait_for(lambda s: all(j["state"] == "succeeded" for j in s["jobs"]) and len(s["jobs"]) == 2,
                   timeout_s=20, what="both jobs succeeded")
        for name in ("filelink", "dirlink"):
            kinds = d.kinds(job=name)
            assert "snapshot_rejected" in kinds and "snapshot_saved" not in kinds, kinds
            assert json.loads(d.ctl("snapshots", name, "--json").stdout) == []
            assert not list((d.state_dir / "snapshots" / name).glob("*.pt"))
        assert (outside / "secret.pt").exists()
