"""Starting a job as another user hands root nothing the caller chose.

The wrapper a job runs under keeps root's ids (it writes the status file the
job cannot forge). Each test replays an attack of issue #14 through `spawn`,
as a caller that may only start jobs as `nobody` would: a loader variable in
the job's environment, a working directory or a command only root may reach.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from harness import wait_until
from gpuguard.supervisor import exitcode
from gpuguard.supervisor.process import WRAPPER_ENV, UserSpec, spawn

pytestmark = [
    pytest.mark.e2e, pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start jobs as nobody"),
]

SECRET = "root-only-secret-4711"
# Every process that loads it leaves a file uid-PID holding "UID EUID".
PRELOAD_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

__attribute__((constructor)) static void record_uid(void) {
    char path[4096], line[64];
    snprintf(path, sizeof path, "%s/uid-%d", RECORD_DIR, (int)getpid());
    int n = snprintf(line, sizeof line, "%d %d\n", (int)getuid(), (int)geteuid());
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
        write(fd, line, n);
        close(fd);
    }
}
"""


@pytest.fixture
def nobody() -> UserSpec:
    return UserSpec.lookup("nobody")


@pytest.fixture
def root_only() -> Iterator[Path]:
    """A directory only root may enter (mkdtemp makes it 0700), with an open subdirectory and a secret in it."""
    top = Path(tempfile.mkdtemp(prefix="gpuguard-root-only-"))
    assert (top.stat().st_mode & 0o777, top.stat().st_uid) == (0o700, 0)
    sub = top / "sub"
    sub.mkdir(mode=0o755)
    (sub / "secret").write_text(SECRET + "\n")
    (sub / "secret").chmod(0o644)
    try:
        yield sub
    finally:
        shutil.rmtree(top)


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        entries = [e.decode() for e in f.read().split(b"\0") if e]
    return dict(e.partition("=")[::2] for e in entries)


def test_ld_preload_in_the_job_env_never_runs_as_root(open_dir: Path, nobody: UserSpec) -> None:  # noqa: F811
    """A real LD_PRELOAD library records the uid of every process that loads it: the job's, never root's."""
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler to build the LD_PRELOAD library")
    records = open_dir / "records"
    records.mkdir()
    records.chmod(0o1777)
    source = open_dir / "preload.c"
    source.write_text(PRELOAD_C)
    library = open_dir / "preload.so"
    subprocess.run(
        [cc, "-shared", "-fPIC", f'-DRECORD_DIR="{records}"', "-o", str(library), str(source)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    library.chmod(0o755)
    job = spawn(
        ["/bin/true"],
        env={"PATH": "/usr/bin:/bin", "LD_PRELOAD": str(library)},
        cwd=open_dir,
        user=nobody,
        log_path=open_dir / "job.log",
    )
    assert job.wait(10) == 0
    seen = [tuple(map(int, p.read_text().split())) for p in records.iterdir()]
    assert (0, 0) not in seen and all(0 not in ids for ids in seen), seen
    # The library did load, in the job's own process: the user's choice for it.
    assert seen == [(nobody.uid, nobody.uid)]


def test_the_root_wrapper_starts_with_none_of_the_job_env(open_dir: Path, nobody: UserSpec) -> None:  # noqa: F811
    """Loader and interpreter variables reach the job (as nobody), never the wrapper that keeps root's ids."""
    hostile = {
        "LD_PRELOAD": str(open_dir / "x.so"),
        "LD_LIBRARY_PATH": str(open_dir),
        "GCONV_PATH": str(open_dir),
        "PYTHONPATH": str(open_dir),
        "PYTHONSTARTUP": str(open_dir / "x.py"),
        "PYTHONINSPECT": "1",
    }
    job = spawn(
        ["/bin/sleep", "30"],
        env={"PATH": "/usr/bin:/bin", **hostile},
        cwd=open_dir,
        user=nobody,
        log_path=open_dir / "job.log",
    )
    try:
        inner = wait_until(lambda: [p for p in job.tree() if p.pid != job.pid], 10, "the job's process", 0.02)
        assert psutil.Process(job.pid).uids().real == 0
        assert _environ(job.pid) == dict(WRAPPER_ENV)
        assert os.readlink(f"/proc/{job.pid}/cwd") == "/"
        assert inner[0].uids().real == nobody.uid
        assert hostile.items() <= _environ(inner[0].pid).items()
        assert _environ(inner[0].pid)[exitcode.MARKER] == str(job.pid)
    finally:
        job.stop(None, grace_s=0, term_timeout_s=5)


def test_a_workdir_only_root_may_enter_fails_the_start(
    root_only: Path, open_dir: Path, nobody: UserSpec  # noqa: F811
) -> None:
    """Entered as root, the job would run in it and read what only root may reach."""
    log = open_dir / "job.log"
    with pytest.raises(PermissionError, match="working directory"):
        spawn(["/bin/cat", "secret"], env={"PATH": "/usr/bin:/bin"}, cwd=root_only, user=nobody, log_path=log)
    text = log.read_text()
    assert SECRET not in text
    assert f"cannot start: working directory '{root_only}' as uid {nobody.uid}: Permission denied" in text
    assert exitcode.read_status(open_dir / "job.log.exit") == exitcode.START_FAILED


def test_a_command_only_root_may_reach_fails_alike_whether_it_exists_or_not(
    root_only: Path, open_dir: Path, nobody: UserSpec  # noqa: F811
) -> None:
    """Looked up as root, "not found" vs "started" would tell nobody what a root-only directory holds."""
    program = root_only / "program"
    program.write_text("#!/bin/sh\necho ran\n")
    program.chmod(0o755)
    for name in ("program", "missing"):
        log = open_dir / f"{name}.log"
        with pytest.raises(PermissionError, match="Permission denied"):
            spawn([str(root_only / name)], env={"PATH": "/usr/bin:/bin"}, cwd=open_dir, user=nobody, log_path=log)
        assert "ran" not in log.read_text()
