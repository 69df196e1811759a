"""Where a job's files live, and the environment that tells the job about them."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from gpuguard import contract
from gpuguard.durable import write_all
from gpuguard.supervisor.job import Job
from gpuguard.supervisor.process import UserSpec


SLOTS = (0, 1)  # exit-status slots: an attempt and its warm standby, in turn


@dataclass(frozen=True, slots=True)
class JobFiles:
    """The state dir keeps what must survive (output, exit status); the runtime dir
    beside the socket holds what the job writes for the daemon (heartbeat, checkpoint path)."""

    jobs_dir: Path  # STATE_DIR/jobs
    runtime_dir: Path  # the socket's dir /jobs

    def runtime(self, name: str) -> Path:
        return self.runtime_dir / name

    def heartbeat(self, name: str) -> Path:
        return self.runtime(name) / "heartbeat"

    def checkpoint_file(self, name: str) -> Path:
        return self.runtime(name) / "checkpoint-path"

    def log(self, name: str) -> Path:
        return self.jobs_dir / name / "output.log"

    def status(self, name: str, slot: int = 0) -> Path:
        """The exit status of the attempt in `slot`: an attempt and the job's warm standby
        (standby.py) use the two slots in turn, so each has its own wrapper, cgroup and status."""
        return self.jobs_dir / name / ("exit-status" if slot == 0 else f"exit-status.{slot}")

    def handover(self, name: str, slot: int) -> Path:
        """Where the standby of `slot` is told to start (GPUGUARD_STANDBY_FILE): in the
        daemon's 0711 directory, so the job can read it by name but plant nothing there."""
        return self.jobs_dir / name / f"handover.{slot}"

    def fault_note(self, name: str) -> Path:
        """Why the job is asked to checkpoint (GPUGUARD_FAULT_FILE, gpuguard/fault.py): beside the
        hand-over, for the same reason; one per job (the attempt inside tells whose it is)."""
        return self.jobs_dir / name / "fault"

    def prepare(self, job: Job) -> None:
        """The job's directories, its runtime dir owned by its user (it writes there).

        STATE_DIR/jobs/NAME is the daemon's and 0711: the job's user opens its
        log there by name, but can neither list the directory nor create,
        replace or remove anything in it, so the exit status the wrapper writes
        beside the log cannot be forged.
        """
        _daemon_dir(self.jobs_dir / job.name, 0o711)
        runtime = self.runtime(job.name)
        runtime.mkdir(mode=0o700, exist_ok=True)
        user = job.spec.user
        if user is not None and os.geteuid() == 0:
            os.chown(runtime, user.uid, user.gid)


def _daemon_dir(path: Path, mode: int) -> None:
    """Make path a directory of the daemon's with mode; one an older daemon made 0700 is opened up to mode.

    A symlink there fails (never followed), and so does a directory of another owner.
    """
    path.mkdir(mode=mode, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        owner = os.fstat(fd).st_uid
        if owner != os.geteuid():
            raise PermissionError(errno.EPERM, f"owned by uid {owner}, not the daemon's", str(path))
        os.fchmod(fd, mode)  # whatever the daemon's umask
    finally:
        os.close(fd)


def job_env(job: Job, files: JobFiles, checkpoint_signal: str, resume: str | None) -> dict[str, str]:
    """The blueprint's environment minus what is not the job's, plus the contract's variables."""
    env = {k: v for k, v in job.spec.env.items() if contract.for_job(k)}
    env |= {
        contract.CUDA_VISIBLE_DEVICES: ",".join(job.attempt.gpus),
        contract.ENV_JOB: job.name,
        contract.ENV_ATTEMPT: str(job.attempt.number),
        contract.ENV_CHECKPOINT_SIGNAL: checkpoint_signal,
        contract.ENV_HEARTBEAT: str(files.heartbeat(job.name)),
        contract.ENV_CHECKPOINT_FILE: str(files.checkpoint_file(job.name)),
        contract.ENV_FAULT_FILE: str(files.fault_note(job.name)),
    }
    if resume:
        env[contract.ENV_RESUME_FROM] = resume
    # stock torchrun dies of the checkpoint signal and orphans its workers;
    # told to handle it, its agent passes it on to every worker (docs/DDP.md)
    env.setdefault(contract.ENV_TORCHRUN_SIGNALS, f"SIGTERM,SIGINT,SIGHUP,SIGQUIT,{checkpoint_signal}")
    return env


def write_for_job(path: Path, data: bytes, user: UserSpec | None) -> None:
    """Write a file for the job atomically into the daemon's own directory (path's parent,
    0711): a temp file made O_EXCL|O_NOFOLLOW through the directory's descriptor, readable
    by the job's user only, then renamed into place. The job can neither list nor create
    anything there, so nothing it planted is ever followed or written through."""
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        owner = os.fstat(dfd).st_uid
        if owner != os.geteuid():
            raise PermissionError(f"{path.parent} is owned by uid {owner}, not the daemon's")
        tmp = f".{path.name}.tmp"
        _unlink_at(tmp, dfd)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            if user is not None and os.geteuid() == 0:
                os.fchown(fd, user.uid, user.gid)
            os.fchmod(fd, 0o400)
            write_all(fd, data)
        finally:
            os.close(fd)
        os.rename(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
    finally:
        os.close(dfd)


def remove(path: Path) -> None:
    """Remove a file written by write_for_job (never following a link in its directory); gone
    already is fine."""
    try:
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        _unlink_at(path.name, dfd)
    finally:
        os.close(dfd)


def _unlink_at(name: str, dfd: int) -> None:
    try:
        os.unlink(name, dir_fd=dfd)
    except FileNotFoundError:
        pass
