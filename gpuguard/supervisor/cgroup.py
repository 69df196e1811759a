"""A job's own cgroup v2: every descendant of the job, escapees included, and a kill that misses none.

Each job runs in a child cgroup of the daemon's own v2 cgroup, named after
the job and the daemon's state (see `job_dir`), so a restarted daemon finds
it again. The wrapper's child joins it before it execs the job (exitcode.py),
so every process the job ever forks is born in it, whatever session it makes
or whoever it is reparented to; the wrapper itself stays outside, so killing
the cgroup never takes the wrapper before it records the job's exit.

Without a writable cgroup v2 hierarchy (none mounted, read-only, mkdir
refused) the job is tracked by its process tree alone, as `jobprocess` does,
and one log line says so.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import structlog

from gpuguard import contract
from gpuguard.supervisor import pids

log = structlog.get_logger("gpuguard.supervisor")

PREFIX = "gpuguard.job."
_KILL_ROUNDS = 10  # without cgroup.kill: rounds of listing and SIGKILLing (a member may fork before it dies)
_UNUSABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT)  # mkdir errors that hold for every job
_hierarchy: dict[str, tuple[Path, str] | None] = {}  # "own": the daemon's cgroup (directory, path), once looked for


@dataclass(frozen=True, slots=True)
class JobCgroup:
    """One job's cgroup: its directory, and its path as /proc/PID/cgroup writes it."""

    path: Path
    rel: str

    def pids(self) -> list[int]:
        """Every process in the cgroup now (zombies are not listed); [] once it is gone."""
        try:
            return [int(line) for line in (self.path / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return []

    def holds(self, pid: int) -> bool:
        """Is pid a member of this cgroup?"""
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            return False
        return f"0::{self.rel}" in lines

    def kill(self) -> list[int]:
        """SIGKILL every member: by cgroup.kill (Linux 5.14+, no fork escapes it), else pid by pid.

        Returns the pids that were members when the kill began.
        """
        if not (self.path / "cgroup.kill").exists():
            return self._kill_each()
        members = self.pids()
        try:
            _write(self.path / "cgroup.kill", "1")
        except FileNotFoundError:  # removed meanwhile: it was empty
            return []
        return members

    def _kill_each(self) -> list[int]:
        """SIGKILL the listed members until a round finds none new; each is checked to be a member after its pidfd is open."""
        killed: list[int] = []
        for _ in range(_KILL_ROUNDS):
            fresh = [
                pid
                for pid in self.pids()
                if pid not in killed and pids.signal_checked(pid, signal.SIGKILL, lambda pid=pid: self.holds(pid))
            ]
            if not fresh:
                break
            killed += fresh
        return killed

    def remove(self) -> bool:
        """rmdir the cgroup once it is empty; False while a process is still in it."""
        try:
            self.path.rmdir()
        except FileNotFoundError:
            return True
        except OSError:  # EBUSY: members left
            return False
        return True


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _find_own() -> tuple[Path, str] | str:
    """The daemon's own cgroup: its directory in a writable cgroup2 mount and its path; else why there is none."""
    try:
        own = next(line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::"))
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except (OSError, StopIteration):
        return "no cgroup v2 membership in /proc/self/cgroup"
    for line in mounts:  # on unified hosts /sys/fs/cgroup, on hybrid ones /sys/fs/cgroup/unified
        fields, _, fs = line.partition(" - ")
        parts = fields.split()
        if len(parts) < 6 or not fs.startswith("cgroup2 "):
            continue
        base = Path(parts[4]) / own.lstrip("/")
        if "rw" in parts[5].split(",") and (base / "cgroup.procs").is_file() and os.access(base, os.W_OK):
            return base, own
    return f"no writable cgroup2 mount holds the daemon's cgroup {own}"


def _own() -> tuple[Path, str] | None:
    """The daemon's own cgroup (directory, path), looked for once; None when jobs cannot have cgroups."""
    if "own" not in _hierarchy:
        found = _find_own()
        if isinstance(found, str):
            log.warning("cgroup_unavailable", reason=found, fallback="jobs are tracked by their process tree only")
        _hierarchy["own"] = None if isinstance(found, str) else found
    return _hierarchy["own"]


def job_dir(name: str, status_path: Path) -> str:
    """The cgroup's directory name: the job's name and a digest of its status file's path.

    The digest keeps apart the jobs of two daemons with different state
    directories in one cgroup (tests, a second instance); a restarted daemon,
    with the same state directory, computes the same name.
    """
    if not contract.valid_job_name(name):
        raise ValueError(f"not a job name: {name!r}")
    digest = hashlib.sha256(os.fsencode(status_path.absolute())).hexdigest()[:8]
    return f"{PREFIX}{name}.{digest}"


def _at(name: str, status_path: Path) -> JobCgroup | None:
    own = _own()
    if own is None:
        return None
    base, path = own
    leaf = job_dir(name, status_path)
    return JobCgroup(base / leaf, f"{path.rstrip('/')}/{leaf}")


def create(name: str, status_path: Path) -> JobCgroup | None:
    """The job's cgroup, made if need be (an earlier attempt's is reused); None: track by process tree."""
    group = _at(name, status_path)
    if group is None:
        return None
    try:
        group.path.mkdir(exist_ok=True)
    except OSError as exc:
        log.warning("cgroup_unavailable", job=name, reason=str(exc), fallback="jobs are tracked by their process tree only")
        if exc.errno in _UNUSABLE:
            _hierarchy["own"] = None
        return None
    return group


def find(name: str, status_path: Path) -> JobCgroup | None:
    """The cgroup a job was started in, after a daemon restart; None when it has none."""
    group = _at(name, status_path)
    return group if group is not None and group.path.is_dir() else None
