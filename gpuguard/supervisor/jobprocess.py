"""One running attempt of a job: its whole process tree, watched and stopped.

The main process is the `exitcode` wrapper, which forwards the checkpoint
signal to the job's own main process. Every process is identified by
(pid, create_time), checked before any signal, so a reused pid is never
signalled. Descendants that start their own session (torchrun workers) are
found through parent links; those orphaned when an intermediate parent dies
are found because every pid ever seen in the tree is remembered (call
`tree()` every monitor tick), and, when the daemon is a child subreaper
(`pids.become_subreaper()`), by the wrapper's pid that the wrapper puts into
the job's environment (`exitcode.MARKER`). A job with its own cgroup
(`cgroup.JobCgroup`) has every member of that cgroup counted as its own too,
so a process that left the session and was reparented away is still found,
also by a daemon that adopted the job after a restart; the kill phase kills
the whole cgroup as well.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil

from gpuguard.supervisor import exitcode, foreign, pids
from gpuguard.supervisor.cgroup import JobCgroup, find

_POLL_S = 0.02  # how often stop() looks whether the tree is gone
_KILL_WAIT_S = 2.0  # after SIGKILL: how long until a process counts as a survivor
_WRAPPER_WAIT_S = 0.5  # after killing the job: time for the wrapper to record it
_FROZEN_CHECK_S = 0.25  # during the grace: how often to look whether the job is stopped

StopPhase = Literal["checkpoint", "term", "kill", "already_exited"]


@dataclass(frozen=True, slots=True)
class StopResult:
    """How stop() went, for the job's record and the events."""

    returncode: int | None  # the main process's exit status; None = unknown
    phase: StopPhase | None  # the phase in which the main process ended; None = it never did
    killed: tuple[int, ...]  # pids that had to be SIGKILLed
    survivors: tuple[int, ...]  # pids still alive after everything (should be empty)


class JobProcess:
    """One running attempt of a job: its main process (the wrapper) and everything below it."""

    def __init__(
        self,
        pid: int,
        start_time: float,
        status_path: Path,
        *,
        popen: subprocess.Popen[bytes] | None = None,
        cgroup: JobCgroup | None = None,
    ) -> None:
        self.pid = pid
        self.cgroup = cgroup  # where every descendant of the job lives; None: the process tree alone
        self.start_time = start_time  # psutil create_time: (pid, start_time) is the identity
        self.status_path = status_path
        self._popen = popen  # set only when the process is our own child
        self._returncode: int | None = None
        self._gone = False
        self._known: dict[int, float] = {}  # every pid seen in the tree -> its create_time
        self.ever: set[int] = {pid}  # every pid the tree ever had: NVML may still list them on a GPU
        self._pidfd: int | None = None
        self._close_pidfd: Callable[[], None] = lambda: None
        if pids.pidfd_supported():
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                fd = None
            if fd is not None:
                self._pidfd = fd
                self._close_pidfd = weakref.finalize(self, os.close, fd)
        if not pids.same_process(pid, start_time):  # after opening: a pidfd of some other process is dropped
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
        if self.cgroup is not None:
            self.cgroup.remove()  # only once it is empty: processes the job left keep it

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
                running = pids.same_process(self.pid, self.start_time) and proc.status() != psutil.STATUS_ZOMBIE
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

    def _walk(self) -> tuple[dict[int, float], dict[int, pids.ProcStat]]:
        table = pids.scan()
        roots = {pid for pid, ct in self._known.items() if pid in table and pids.same_process(pid, ct)}
        main_ours = self.pid in table and pids.same_process(self.pid, self.start_time)  # running, or its zombie
        if main_ours:
            roots.add(self.pid)
        # While anyone still has our session id the kernel cannot hand the pid to
        # another process, so session members are ours unless the pid is reused.
        if main_ours or self.pid not in table:
            roots |= {pid for pid, st in table.items() if st.sid == self.sid}
            # Orphans handed to us as subreaper that left the session: known by the wrapper's mark.
            me = os.getpid()
            roots |= {
                pid for pid, st in table.items() if st.ppid == me and pid != self.pid and pids.marked(pid) == self.pid
            }
        if self.cgroup is not None:  # everything the job forked, whichever session or parent it has now
            roots |= {pid for pid in self.cgroup.pids() if pid in table}
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
            ct = self.start_time if pid == self.pid else pids.create_time(pid)
            if ct is None:
                continue
            if table[pid].zombie:
                self._reap(pid, table[pid])
                continue
            live[pid] = ct
        self._known = dict(live)
        self.ever.update(live)
        return live, table

    def _reap(self, pid: int, stat: pids.ProcStat) -> None:
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
            if abs(proc.create_time() - ct) < pids.SAME_TIME_S:
                procs.append(proc)
        return procs

    @property
    def known(self) -> frozenset[int]:
        """The pids of the tree as last walked (call tree() each tick to keep it fresh)."""
        return frozenset(self._known)

    def job_catches(self, sig: int) -> bool | None:
        """Does the job's own main process (the wrapper's child, which the wrapper
        forwards the signal to) catch sig? None when that cannot be told (no child
        yet, or its status unreadable): then the signal is sent as before."""
        ids, table = self._walk()
        children = [pid for pid in ids if pid != self.pid and table[pid].ppid == self.pid and not table[pid].zombie]
        if len(children) != 1:
            return None
        try:
            text = Path(f"/proc/{children[0]}/status").read_text()
        except OSError:
            return None
        caught = foreign.signal_mask(text, "SigCgt")
        return None if caught is None else foreign.in_mask(caught, sig)

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
        return pids.signal_verified(self.pid, self.start_time, sig)

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
                delivered = pids.signal_verified(pid, ct, sig)
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
        """SIGKILL the descendants and the job's cgroup (the wrapper is not in it) first, give the
        wrapper a moment to record how its child died, then it."""
        tree = self._tree_ids().items()
        killed = [pid for pid, ct in tree if pid != self.pid and pids.signal_verified(pid, ct, signal.SIGKILL)]
        if self.cgroup is not None:
            killed += [pid for pid in self.cgroup.kill() if pid not in killed]
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
        if not survivors and self.cgroup is not None:
            self.cgroup.remove()
        return StopResult(self.exit_status(), phase, tuple(killed), survivors)


    def end_leftovers(self, term_timeout_s: float) -> tuple[int, ...]:
        """After the main process ended on its own: what it left behind (children,
        escapees in its cgroup) is stopped too, SIGTERM then SIGKILL, as systemd does
        for a service's control group. Returns the pids that were left."""
        left = tuple(pid for pid in self._tree_ids() if pid != self.pid)
        if left:
            self.stop(None, 0.0, term_timeout_s)
        elif self.cgroup is not None:
            self.cgroup.remove()
        return left


def kill_cgroup_of(job_name: str, status_path: Path) -> tuple[int, ...]:
    """A job that ended while no daemon ran: kill what is left in its cgroup, remove it."""
    group = find(job_name, status_path)
    if group is None:
        return ()
    left = tuple(group.kill())
    group.remove()
    return left


def adopt(pid: int, start_time: float, *, status_path: Path, job_name: str | None = None) -> JobProcess | None:
    """Find a job again after a daemon restart; None when that process is gone (or the pid reused).

    With job_name, the cgroup spawn() made for that job is found again, and
    with it the processes that left the job's tree. For a job that ended while
    no daemon ran, `exitcode.read_status(status_path)` still tells how.
    """
    job = JobProcess(pid, start_time, status_path, cgroup=find(job_name, status_path) if job_name else None)
    return job if job.alive() else None
