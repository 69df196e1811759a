"""Start, find, signal and stop a managed job's whole process tree.

Knows nothing of GPUs or job policy. A job runs under the `exitcode` wrapper
in its own session (so a SIGKILLed daemon does not take it along, and a new
daemon can still learn how it ended); the wrapper is the "main process" here
and forwards the checkpoint signal to the job's own main process.

Every process is identified by (pid, create_time), checked before any signal,
so a reused pid is never signalled. Descendants that start their own session
(torchrun workers) are found through parent links; those orphaned when an
intermediate parent dies are found because every pid ever seen in the tree is
remembered (call `tree()` every monitor tick), and, when the daemon is a
child subreaper (`become_subreaper()`), by the wrapper's pid that the wrapper
puts into the job's environment (`exitcode.MARKER`).
"""

from __future__ import annotations

import ctypes
import functools
import os
import pwd
import select
import shutil
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil

from gpuguard.supervisor import exitcode

PR_SET_CHILD_SUBREAPER = 36
_POLL_S = 0.02  # how often stop() looks whether the tree is gone
_KILL_WAIT_S = 2.0  # after SIGKILL: how long until a process counts as a survivor
_WRAPPER_WAIT_S = 0.5  # after killing the job: time for the wrapper to record it
_FROZEN_CHECK_S = 0.25  # during the grace: how often to look whether the job is stopped

StopPhase = Literal["checkpoint", "term", "kill", "already_exited"]


@dataclass(frozen=True, slots=True)
class UserSpec:
    """The ids a job runs with when the daemon is root."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    @classmethod
    def lookup(cls, name: str) -> UserSpec:
        """The user's ids and supplementary groups from the passwd/group databases (KeyError if unknown)."""
        entry = pwd.getpwnam(name)
        groups = tuple(g for g in os.getgrouplist(name, entry.pw_gid) if g != entry.pw_gid)
        return cls(entry.pw_uid, entry.pw_gid, groups)


@dataclass(frozen=True, slots=True)
class StopResult:
    returncode: int | None  # the main process's exit status; None = unknown
    phase: StopPhase | None  # the phase in which the main process ended; None = it never did
    killed: tuple[int, ...]  # pids that had to be SIGKILLed
    survivors: tuple[int, ...]  # pids still alive after everything (should be empty)


def become_subreaper() -> bool:
    """Make orphans of our jobs' trees re-parent to this process, where `tree()` still finds them."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def default_status_path(log_path: Path) -> Path:
    """Where the wrapper records the exit status unless spawn() is told otherwise."""
    return log_path.with_name(log_path.name + ".exit")


@functools.cache
def _pidfd_supported() -> bool:
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return hasattr(signal, "pidfd_send_signal")


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _same(pid: int, create_time: float) -> bool:
    """True when pid is still the process that was created at create_time."""
    found = _create_time(pid)
    return found is not None and abs(found - create_time) < 0.005


def _signal_verified(pid: int, create_time: float, sig: int) -> bool:
    """Signal pid only if it is still the same process; by pidfd so the check cannot race."""
    if not _pidfd_supported():
        if not _same(pid, create_time):
            return False
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        return True
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        if not _same(pid, create_time):  # checked after opening: the fd pins this very process
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class _Stat:
    ppid: int
    sid: int
    zombie: bool


def _scan() -> dict[int, _Stat]:
    """ppid, session and zombie state of every process, from one pass over /proc."""
    table: dict[int, _Stat] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rfind(b")") + 2 :].split()  # after "pid (comm) "
        table[int(name)] = _Stat(ppid=int(fields[1]), sid=int(fields[3]), zombie=fields[0] in (b"Z", b"X"))
    return table


def _marked(pid: int) -> int | None:
    """The wrapper pid recorded in a process's environment, if any."""
    prefix = exitcode.MARKER.encode() + b"="
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            entries = f.read().split(b"\0")
    except OSError:
        return None
    for entry in entries:
        if entry.startswith(prefix):
            try:
                return int(entry[len(prefix) :])
            except ValueError:
                return None
    return None


class JobProcess:
    """One running attempt of a job: its main process (the wrapper) and everything below it."""

    def __init__(
        self,
        pid: int,
        start_time: float,
        status_path: Path,
        *,
        popen: subprocess.Popen[bytes] | None = None,
    ) -> None:
        self.pid = pid
        self.start_time = start_time  # psutil create_time: (pid, start_time) is the identity
        self.status_path = status_path
        self._popen = popen  # set only when the process is our own child
        self._returncode: int | None = None
        self._gone = False
        self._known: dict[int, float] = {}  # every pid seen in the tree -> its create_time
        self._pidfd: int | None = None
        self._close_pidfd: Callable[[], None] = lambda: None
        if _pidfd_supported():
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                fd = None
            if fd is not None:
                self._pidfd = fd
                self._close_pidfd = weakref.finalize(self, os.close, fd)
        if not _same(pid, start_time):  # after opening: a pidfd of some other process is dropped
            self._mark_gone()

    @property
    def pgid(self) -> int:
        """spawn() makes the main process the leader of its own group..."""
        return self.pid

    @property
    def sid(self) -> int:
        """...and of its own session."""
        return self.pid

    @property
    def returncode(self) -> int | None:
        """The main process's exit status once known (see exit_status())."""
        return self._returncode

    def close(self) -> None:
        """Release the pidfd; the process itself is left alone."""
        self._close_pidfd()
        self._pidfd = None

    def _mark_gone(self) -> None:
        self._gone = True
        self.close()

    def alive(self) -> bool:
        """True while the main process runs (a zombie or a reused pid is not alive)."""
        if self._gone:
            return False
        if self._popen is not None:
            running = self._popen.poll() is None
            if not running:
                self._returncode = self._popen.returncode
        elif self._pidfd is not None:
            running = not select.select([self._pidfd], [], [], 0)[0]
        else:
            try:
                proc = psutil.Process(self.pid)
                running = _same(self.pid, self.start_time) and proc.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                running = False
        if not running:
            self._mark_gone()
        return running

    def wait(self, timeout_s: float) -> int | None:
        """The exit status once the main process ended within timeout_s, else None.

        None also when it ended but its status is unknown (an adopted job whose
        wrapper was SIGKILLed): tell the two apart with alive().
        """
        if not self._wait_gone(timeout_s):
            return None
        return self.exit_status()

    def _wait_gone(self, timeout_s: float) -> bool:
        if self._gone:
            return True
        if self._popen is not None:
            try:
                self._popen.wait(max(timeout_s, 0.0))
            except subprocess.TimeoutExpired:
                return False
        elif self._pidfd is not None:
            select.select([self._pidfd], [], [], max(timeout_s, 0.0))
        else:
            deadline = time.monotonic() + timeout_s
            while self.alive() and time.monotonic() < deadline:
                time.sleep(_POLL_S)
        return not self.alive()

    def exit_status(self) -> int | None:
        """Exit code, or -N for death by signal N; None while running or when honestly unknown."""
        if self.alive():
            return None
        if self._returncode is None:
            self._returncode = exitcode.read_status(self.status_path)
        return self._returncode

    def _tree_ids(self) -> dict[int, float]:
        """pid -> create_time of the live tree, main first; refreshes the known set and reaps our zombies."""
        return self._walk()[0]

    def _walk(self) -> tuple[dict[int, float], dict[int, _Stat]]:
        table = _scan()
        roots = {pid for pid, ct in self._known.items() if pid in table and _same(pid, ct)}
        main_ours = self.pid in table and _same(self.pid, self.start_time)  # running, or its zombie
        if main_ours:
            roots.add(self.pid)
        # While anyone still has our session id the kernel cannot hand the pid to
        # another process, so session members are ours unless the pid is reused.
        if main_ours or self.pid not in table:
            roots |= {pid for pid, st in table.items() if st.sid == self.sid}
            # Orphans handed to us as subreaper that left the session: known by the wrapper's mark.
            me = os.getpid()
            roots |= {
                pid for pid, st in table.items() if st.ppid == me and pid != self.pid and _marked(pid) == self.pid
            }
        children: dict[int, list[int]] = {}
        for pid, st in table.items():
            children.setdefault(st.ppid, []).append(pid)
        found: list[int] = []
        todo = sorted(roots, key=lambda p: p != self.pid)
        seen = set(todo)
        while todo:
            pid = todo.pop(0)
            found.append(pid)
            for child in children.get(pid, ()):
                if child not in seen:
                    seen.add(child)
                    todo.append(child)
        live: dict[int, float] = {}
        for pid in found:
            ct = self.start_time if pid == self.pid else _create_time(pid)
            if ct is None:
                continue
            if table[pid].zombie:
                self._reap(pid, table[pid])
                continue
            live[pid] = ct
        self._known = dict(live)
        return live, table

    def _reap(self, pid: int, stat: _Stat) -> None:
        """Collect zombies that are our children: the main one, or orphans we got as subreaper."""
        if pid == self.pid:
            self.alive()
        elif stat.ppid == os.getpid():
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass

    def tree(self) -> list[psutil.Process]:
        """The main process and all its live descendants, including other sessions and orphans."""
        procs = []
        for pid, ct in self._tree_ids().items():
            try:
                proc = psutil.Process(pid)
            except psutil.Error:
                continue
            if abs(proc.create_time() - ct) < 0.005:
                procs.append(proc)
        return procs

    def signal_main(self, sig: int) -> bool:
        """Send sig to the main process (the wrapper forwards catchable ones to the job); False if gone."""
        if not self.alive():
            return False
        if self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, sig)
            except ProcessLookupError:
                return False
            return True
        return _signal_verified(self.pid, self.start_time, sig)

    def signal_tree(self, sig: int) -> list[int]:
        """Send sig to every process of the tree; returns the pids that got it.

        The wrapper itself is skipped for signals it forwards once its child
        exists, so the job's main process gets each signal once, not twice.
        """
        ids, table = self._walk()
        wrapper_has_child = any(table[pid].ppid == self.pid for pid in ids)
        sent = []
        for pid, ct in ids.items():
            if pid == self.pid and sig in exitcode.FORWARDED and wrapper_has_child:
                continue
            if pid == self.pid and self._pidfd is not None:
                delivered = self.signal_main(sig)
            else:
                delivered = _signal_verified(pid, ct, sig)
            if delivered:
                sent.append(pid)
        return sent

    def _frozen(self) -> bool:
        """Every process under the wrapper is stopped (SIGSTOP, a tracer): none can act on a signal."""
        procs = [p for p in self.tree() if p.pid != self.pid]
        try:
            return bool(procs) and all(p.status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP) for p in procs)
        except psutil.Error:
            return False

    def _wait_gone_unless_frozen(self, timeout_s: float) -> bool:
        """Like _wait_gone, but give up early when the job is frozen and cannot answer."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if self._wait_gone(max(0.0, min(_FROZEN_CHECK_S, remaining))):
                return True
            if remaining <= 0 or self._frozen():
                return False

    def _wait_tree_gone(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self._tree_ids():
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_S)
        return True

    def _kill(self) -> list[int]:
        """SIGKILL the descendants first, give the wrapper a moment to record how its child died, then it."""
        killed = [
            pid for pid, ct in self._tree_ids().items() if pid != self.pid and _signal_verified(pid, ct, signal.SIGKILL)
        ]
        self._wait_gone(_WRAPPER_WAIT_S)
        if self.alive() and self.signal_main(signal.SIGKILL):
            killed.append(self.pid)
        return killed

    def stop(
        self,
        checkpoint_signal: int | None,
        grace_s: float,
        term_timeout_s: float,
        on_phase: Callable[[str], None] | None = None,
    ) -> StopResult:
        """The contract's stop: checkpoint signal to the main process, then SIGTERM the tree, then SIGKILL.

        A job whose processes are all stopped (SIGSTOP) can answer neither the
        checkpoint signal nor SIGTERM: it is SIGKILLed as soon as that is seen.
        on_phase is told "checkpoint", "term" and "kill" as each begins.
        """
        notify = on_phase or (lambda _phase: None)
        self._tree_ids()  # remember the tree before anything in it exits
        phase: StopPhase | None = None if self.alive() else "already_exited"
        killed: list[int] = []
        if phase is None and checkpoint_signal is not None:
            notify("checkpoint")
            self.signal_main(checkpoint_signal)
            if self._wait_gone_unless_frozen(grace_s):
                phase = "checkpoint"
        if self._tree_ids() and self._frozen():
            # a stopped job can act on no signal but SIGKILL: waiting out the
            # grace or SIGTERM's timeout would only delay the restart
            notify("kill")
            killed = self._kill()
            self._wait_tree_gone(_KILL_WAIT_S)
            if phase is None and not self.alive():
                phase = "kill"
        if self._tree_ids():
            notify("term")
            self.signal_tree(signal.SIGTERM)
            gone = self._wait_tree_gone(term_timeout_s)
            if phase is None and not self.alive():
                phase = "term"
            if not gone:
                notify("kill")
                killed = self._kill()
                self._wait_tree_gone(_KILL_WAIT_S)
                if phase is None and not self.alive():
                    phase = "kill"
        survivors = tuple(self._tree_ids())
        return StopResult(self.exit_status(), phase, tuple(killed), survivors)


def _open_log(path: Path, user: UserSpec | None) -> int:
    """Open the job's log for appending; a new one is 0640 and belongs to the job's user."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags | os.O_EXCL, 0o640)
        os.fchmod(fd, 0o640)  # whatever the daemon's umask
    except FileExistsError:
        fd = os.open(path, flags)
    if user is not None and os.geteuid() == 0:
        os.fchown(fd, user.uid, user.gid)
    return fd


def _resolve(argv0: str, env: Mapping[str, str], cwd: Path) -> None:
    """Fail in the caller, not later in the log, when the command does not exist."""
    if "/" in argv0:
        found = os.access(cwd / argv0, os.X_OK)
    else:
        found = shutil.which(argv0, path=env.get("PATH", os.defpath)) is not None
    if not found:
        raise FileNotFoundError(f"command not found or not executable: {argv0!r}")


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    user: UserSpec | None,
    log_path: Path,
    status_path: Path | None = None,
) -> JobProcess:
    """Start argv (no shell) under the exit-status wrapper, in a new session, detached from the daemon.

    env is the job's whole environment. The job's stdin is /dev/null and its
    output goes to log_path. With user, the job (not the wrapper) runs with
    those ids; that needs root unless user is the daemon's own uid.
    """
    if not argv:
        raise ValueError("empty command")
    _resolve(argv[0], env, cwd)
    drop = user is not None and os.geteuid() == 0
    if user is not None and not drop and user.uid != os.geteuid():
        raise PermissionError(f"running a job as uid {user.uid} needs root")
    status_path = status_path or default_status_path(log_path)
    status_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-I", "-S", exitcode.__file__, str(status_path)]
    if drop:
        assert user is not None
        cmd += ["--user", str(user.uid), str(user.gid), ",".join(map(str, user.groups))]
    cmd += ["--", *argv]
    log_fd = _open_log(log_path, user)
    try:
        popen = subprocess.Popen(
            cmd,
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            close_fds=True,
            start_new_session=True,
        )
    finally:
        os.close(log_fd)
    # Our own unreaped child: its pid cannot have been reused yet.
    return JobProcess(popen.pid, psutil.Process(popen.pid).create_time(), status_path, popen=popen)


def adopt(pid: int, start_time: float, *, status_path: Path) -> JobProcess | None:
    """Find a job again after a daemon restart; None when that process is gone (or the pid reused).

    For a job that ended while no daemon ran, `exitcode.read_status(status_path)`
    still tells how.
    """
    job = JobProcess(pid, start_time, status_path)
    return job if job.alive() else None
