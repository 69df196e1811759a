"""A job's output belongs to its user; its exit status stays the daemon's (issue #14).

STATE_DIR/jobs/NAME is root's and 0711: the job's user reaches output.log
(theirs, 0640) by name but cannot list the directory, create files in it, or
touch the exit-status file the root wrapper writes there. Whatever sits at
output.log before a start (a symlink, a hard link, another user's file) is
never written through or handed to the job's user.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import NOBODY, as_nobody
from gpuguard.supervisor import exitcode
from gpuguard.supervisor.files import JobFiles
from gpuguard.supervisor.job import Job
from gpuguard.supervisor.jobspec import JobSpec
from gpuguard.supervisor.process import UserSpec, spawn

pytestmark = [
    pytest.mark.e2e, pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start jobs as nobody"),
]

NAME = "train"
SECRET = "root-only-secret-4711\n"


@pytest.fixture
def files(open_dir: Path) -> JobFiles:  # noqa: F811
    """The daemon's layout under a directory nobody can reach: STATE_DIR 0711, jobs dirs 0711."""
    state = open_dir / "state"
    state.mkdir(mode=0o711)
    for path in (state / "jobs", open_dir / "run" / "jobs"):
        path.mkdir(mode=0o711, parents=True)
        path.chmod(0o711)
    return JobFiles(state / "jobs", open_dir / "run" / "jobs")


@pytest.fixture
def root_only() -> Iterator[Path]:
    """A file only root may read or write, in a directory only root may enter."""
    top = Path(tempfile.mkdtemp(prefix="gpuguard-root-only-"))
    secret = top / "secret"
    secret.write_text(SECRET)
    secret.chmod(0o600)
    try:
        yield secret
    finally:
        shutil.rmtree(top)


def _run(files: JobFiles, workdir: Path, script: str) -> int | None:
    """One attempt of job NAME as nobody, as the runner starts it, to its end."""
    job = Job(JobSpec(NAME, ("/bin/sh", "-c", script), workdir, user=UserSpec.lookup("nobody")))
    files.prepare(job)
    proc = spawn(
        list(job.spec.command), env={"PATH": "/usr/bin:/bin"}, cwd=workdir, user=job.spec.user,
        log_path=files.log(NAME), status_path=files.status(NAME),
    )  # fmt: skip
    return proc.wait(10)


def _nobody_sh(command: str) -> int:
    return as_nobody(["/bin/sh", "-c", command]).returncode


def test_the_user_reads_the_output_and_cannot_touch_the_exit_status(files: JobFiles, open_dir: Path) -> None:  # noqa: F811
    """Two attempts append to one log of nobody's; the directory (0700 from an older daemon) becomes 0711."""
    job_dir = files.jobs_dir / NAME
    job_dir.mkdir(mode=0o700)
    assert _run(files, open_dir, "echo first-attempt; echo to-stderr >&2") == 0
    assert _run(files, open_dir, "echo second-attempt") == 0
    log, status = files.log(NAME), files.status(NAME)

    st = job_dir.lstat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o711)
    st = log.lstat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY.pw_uid, NOBODY.pw_gid, 0o640)
    st = status.lstat()
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) & 0o022 == 0

    read = as_nobody(["/bin/cat", str(log)])
    assert read.returncode == 0 and read.stdout == "first-attempt\nto-stderr\nsecond-attempt\n"
    assert _nobody_sh(f"ls {job_dir}") != 0
    assert _nobody_sh(f"echo 0 >> {status}") != 0
    assert _nobody_sh(f"echo 0 > {job_dir}/forged && mv -f {job_dir}/forged {status}") != 0
    assert _nobody_sh(f"ln -s /dev/null {job_dir}/link") != 0
    assert _nobody_sh(f"rm -f {status} {log}") != 0
    assert sorted(p.name for p in job_dir.iterdir()) == ["exit-status", "output.log"]
    assert exitcode.read_status(status) == 0


@pytest.mark.parametrize("planted", ["symlink", "hardlink", "root's file"])
def test_what_sits_at_output_log_before_the_start_is_never_written_through(
    files: JobFiles, open_dir: Path, root_only: Path, planted: str  # noqa: F811
) -> None:
    """The start replaces it with a new log of nobody's; the root-only file is untouched and still root's."""
    job_dir = files.jobs_dir / NAME
    job_dir.mkdir(mode=0o711)
    log = files.log(NAME)
    if planted == "symlink":
        log.symlink_to(root_only)
    elif planted == "hardlink":
        os.link(root_only, log)
    else:
        shutil.copy(root_only, log)  # a log of the job when it ran as root
    assert _run(files, open_dir, "echo from-the-job") == 0

    st = root_only.stat()
    assert (root_only.read_text(), st.st_uid, stat.S_IMODE(st.st_mode)) == (SECRET, 0, 0o600)
    st = log.lstat()
    assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY.pw_uid, 0o640)
    assert as_nobody(["/bin/cat", str(log)]).stdout == "from-the-job\n"
