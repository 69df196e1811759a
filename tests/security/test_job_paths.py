"""What the root daemon reads for a job gives the job nothing its user could not read,
and nothing a job writes can hold up the supervisor's tick.

Each test replays an attack of issue #14 on real files, as root, with the
intake objects built directly for a job that runs as `nobody`: the file a
trainer names its checkpoint in (GPUGUARD_CHECKPOINT_FILE) swapped for a
symlink to a root-only file or for a FIFO, a `--checkpoint` only root may
read, and a long copy on the watcher while the tick asks it to watch a job.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from checkpoint_files import make_checkpoint
from harness import as_nobody
from gpuguard.events import EventKind
from gpuguard.health.types import Severity
from gpuguard.supervisor.files import JobFiles
from gpuguard.supervisor.intake import CheckpointIntake
from gpuguard.supervisor.job import Job
from gpuguard.supervisor.jobspec import JobSpec
from gpuguard.supervisor.process import UserSpec
from gpuguard.supervisor.snapshots import AddResult, SnapshotRing

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own files as root and as nobody"),
]

NOBODY = pwd.getpwnam("nobody")
AS_NOBODY = UserSpec(NOBODY.pw_uid, NOBODY.pw_gid, ())
NOBODY_IDS = (NOBODY.pw_uid, NOBODY.pw_gid)
BLOCKED_S = 5.0  # a call still running after this long is blocked


@dataclass
class Harness:
    """One CheckpointIntake with the supervisor's side recorded."""

    tmp: Path
    ring: SnapshotRing = field(init=False)
    files: JobFiles = field(init=False)
    intake: CheckpointIntake = field(init=False)
    jobs: dict[str, Job] = field(default_factory=dict)
    events: list[tuple[str, str]] = field(default_factory=list)  # (kind, message)
    persisted: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ring = SnapshotRing(self.tmp / "snapshots", max_bytes=10**9)
        self.files = JobFiles(self.tmp / "jobs", self.tmp / "run")
        self.files.jobs_dir.mkdir()
        self.files.runtime_dir.mkdir()
        self.intake = CheckpointIntake(self.ring, self.files, self.jobs.get, self._say, self._persist)

    def _say(self, job: Job, kind: str, severity: Severity, message: str) -> None:
        self.events.append((kind, message))

    def _persist(self, job: Job) -> bool:
        self.persisted.append(job.name)
        return True

    def job(self, name: str, workdir: Path, checkpoint: Path | None = None, user: UserSpec | None = AS_NOBODY) -> Job:
        """A job as the supervisor holds it, its runtime dir made and owned by its user."""
        job = Job(JobSpec(name=name, command=("true",), workdir=workdir, user=user, checkpoint=checkpoint))
        self.jobs[name] = job
        self.files.prepare(job)
        return job

    def runtime_file(self, job: Job, make: Callable[[Path], None]) -> Path:
        """The job's checkpoint-path file, made by `make` and owned by nobody, as the job would leave it."""
        path = self.files.checkpoint_file(job.name)
        make(path)
        os.lchown(path, *NOBODY_IDS)
        return path


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    yield h
    h.intake.close()


def run_briefly(call: Callable[[], Any], release: Callable[[], None]) -> bool:
    """Run `call` on a thread: True when it returned within BLOCKED_S; else `release` frees it."""
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(BLOCKED_S)
    blocked = thread.is_alive()
    if blocked:
        release()
        thread.join(BLOCKED_S)
    return not blocked


# ---------------------------------------------------------------- the checkpoint-path file


def test_a_checkpoint_path_file_symlinked_to_a_root_only_file_is_not_read(harness: Harness, tmp_path: Path) -> None:
    """Its content (an absolute path) was shown in `status` as checkpoint_path."""
    secret = tmp_path / "root-only" / "secret"
    secret.parent.mkdir(mode=0o700)
    secret.write_text("/root-only/secret-4711.pt\n")
    secret.chmod(0o600)
    job = harness.job("linked", tmp_path)
    harness.runtime_file(job, lambda p: p.symlink_to(secret))

    with capture_logs() as logs:
        for _ in range(3):  # three ticks
            harness.intake.read_checkpoint_file(job)

    assert job.attempt.checkpoint_found is None and job.checkpoint is None  # status shows no path
    assert harness.persisted == []
    ignored = [e for e in logs if e["event"] == "job_checkpoint_file_ignored"]
    assert len(ignored) == 1 and "symlink" in ignored[0]["reason"]  # one line, not one a tick


def test_a_checkpoint_path_fifo_does_not_block_the_tick(harness: Harness, tmp_path: Path) -> None:
    """A FIFO froze the tick: status and check timed out, an Xid 79 was handled 23 s late."""
    job = harness.job("piped", tmp_path)
    fifo = harness.runtime_file(job, os.mkfifo)

    def let_go() -> None:  # a writer that closes at once ends a blocked open and read
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    assert run_briefly(lambda: harness.intake.read_checkpoint_file(job), let_go), "blocked on the FIFO"
    assert job.checkpoint is None


def test_the_checkpoint_path_file_is_one_absolute_path_in_a_small_file_of_the_job(harness: Harness, tmp_path: Path) -> None:
    named = str(tmp_path / "work" / "last.pt")
    cases = {  # job -> (owner uid, content, taken)
        "rootfile": (0, f"{named}\n".encode(), False),  # not the job's: planted by someone else
        "big": (NOBODY.pw_uid, b"/" + b"a" * 5000, False),
        "nul": (NOBODY.pw_uid, f"{named}\0/etc/shadow".encode(), False),
        "relative": (NOBODY.pw_uid, b"work/last.pt", False),
        "good": (NOBODY.pw_uid, f"{named}\n".encode(), True),
    }
    for name, (owner, content, taken) in cases.items():
        job = harness.job(name, tmp_path)
        path = harness.files.checkpoint_file(name)
        path.write_bytes(content)
        os.chown(path, owner, owner)
        harness.intake.read_checkpoint_file(job)
        assert (job.checkpoint == Path(named)) is taken, name
    assert harness.persisted == ["good"]


# ---------------------------------------------------------------- the checkpoint itself


def test_a_checkpoint_only_root_may_read_is_rejected_for_a_nobody_job(harness: Harness, open_dir: Path) -> None:
    """It was copied into nobody's snapshots, and its size and sha256 shown."""
    checkpoint = open_dir / "last.pt"
    make_checkpoint(checkpoint)
    checkpoint.chmod(0o600)
    job = harness.job("stolen", open_dir, checkpoint)

    harness.intake.ingest(job)

    assert harness.ring.list("stolen") == []
    [(kind, message)] = harness.events
    assert kind == EventKind.SNAPSHOT_REJECTED
    assert f"the job's user (uid {NOBODY.pw_uid}) may not read it (owner uid 0, gid 0, mode 0600)" in message


def test_a_checkpoint_behind_a_directory_nobody_cannot_search_is_rejected(harness: Harness, open_dir: Path) -> None:
    private = open_dir / "private"
    private.mkdir(mode=0o700)
    checkpoint = private / "last.pt"
    make_checkpoint(checkpoint)
    checkpoint.chmod(0o644)
    job = harness.job("hidden", open_dir, checkpoint)

    harness.intake.ingest(job)

    assert harness.ring.list("hidden") == []
    [(kind, message)] = harness.events
    assert kind == EventKind.SNAPSHOT_REJECTED and f"cannot search {private} " in message


def test_a_checkpoint_is_taken_exactly_when_the_jobs_user_could_read_it(harness: Harness, open_dir: Path) -> None:
    nogroup = NOBODY.pw_gid
    cases = {  # job -> (owner uid, group, mode, job user, taken)
        "own": (NOBODY.pw_uid, nogroup, 0o600, AS_NOBODY, True),
        "world": (0, 0, 0o644, AS_NOBODY, True),
        "group": (0, nogroup, 0o640, AS_NOBODY, True),
        "extragroup": (0, 4242, 0o640, UserSpec(NOBODY.pw_uid, nogroup, (4242,)), True),
        "rootjob": (0, 0, 0o600, None, True),  # root may read anything
        "othergroup": (0, 0, 0o640, AS_NOBODY, False),
        "groupshut": (0, nogroup, 0o604, AS_NOBODY, False),  # as the kernel: the group's bits apply, not others'
        "ownshut": (NOBODY.pw_uid, 0, 0o044, AS_NOBODY, False),  # the owner's bits apply
    }
    for name, (uid, gid, mode, user, taken) in cases.items():
        workdir = open_dir / name
        workdir.mkdir(mode=0o755)
        checkpoint = workdir / "last.pt"
        make_checkpoint(checkpoint)
        os.chown(checkpoint, uid, gid)
        checkpoint.chmod(mode)
        harness.intake.ingest(harness.job(name, workdir, checkpoint, user))
        assert bool(harness.ring.list(name)) is taken, (name, harness.events[-1])


# ---------------------------------------------------------------- copies off the tick


def test_ingest_after_an_exit_copies_nothing_the_ring_already_has(
    harness: Harness, open_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watcher took the last write: ingest in the tick is a stat, not a second full read."""
    checkpoint = open_dir / "last.pt"
    make_checkpoint(checkpoint)
    job = harness.job("done", open_dir, checkpoint)
    harness.intake.snapshot(job, checkpoint)  # as the watcher does
    added: list[Path] = []
    real_add = harness.ring.add

    def counted(name: str, source: Path, **kwargs: Any) -> AddResult:
        added.append(source)
        return real_add(name, source, **kwargs)

    monkeypatch.setattr(harness.ring, "add", counted)
    harness.intake.ingest(job)
    assert added == []

    make_checkpoint(checkpoint, b"\x01" * 8192)  # a write the watcher has not taken yet
    harness.intake.ingest(job)
    assert added == [checkpoint] and len(harness.ring.list("done")) == 2


def test_a_long_copy_on_the_watcher_does_not_hold_up_the_tick(
    harness: Harness, open_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """watch() from the tick (a trainer naming its checkpoint) waited for the watcher's copy."""
    copying, release = threading.Event(), threading.Event()

    def slow_add(name: str, source: Path, **kwargs: Any) -> AddResult:
        copying.set()
        release.wait(BLOCKED_S * 3)
        return AddResult(None, False, "test")

    monkeypatch.setattr(harness.ring, "add", slow_add)
    big = harness.job("big", open_dir, open_dir / "big.pt")
    harness.intake.watch(big)
    make_checkpoint(open_dir / "big.pt")
    try:
        assert copying.wait(BLOCKED_S), "the watcher never reported the write"
        other = harness.job("other", open_dir)
        harness.runtime_file(other, lambda p: p.write_text(f"{open_dir / 'other.pt'}\n"))
        assert run_briefly(lambda: harness.intake.read_checkpoint_file(other), release.set), "waited for the copy"
        assert other.checkpoint == open_dir / "other.pt"
    finally:
        release.set()


def test_the_job_can_read_its_snapshot_under_the_units_umask_and_nobody_else_can(open_dir: Path) -> None:
    """The unit runs the daemon with UMask=0027: a snapshot must still be readable by its job
    (GPUGUARD_RESUME_FROM), and by no other user."""
    open_dir.chmod(0o711)
    work = open_dir / "w"  # the job's own files, made before the daemon's umask applies
    work.mkdir(mode=0o755)
    make_checkpoint(work / "last.pt")
    os.chown(work / "last.pt", *NOBODY_IDS)
    old = os.umask(0o027)
    try:
        ring = SnapshotRing(open_dir / "snapshots", max_bytes=10**9)
        (open_dir / "snapshots").chmod(0o711)  # as the daemon makes it
        result = ring.add("j", work / "last.pt", job_workdir=work, job_user=AS_NOBODY)
    finally:
        os.umask(old)
    assert result.snapshot is not None, result.reason
    path = result.snapshot.path
    st = path.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (NOBODY.pw_uid, 0o600)
    reader = ["/usr/bin/head", "-c", "1", str(path)]
    assert as_nobody(reader).returncode == 0  # the job's user reads it
    other = subprocess.run(reader, user=4242, group=4242, extra_groups=[], capture_output=True, timeout=30)
    assert other.returncode != 0  # another user does not
