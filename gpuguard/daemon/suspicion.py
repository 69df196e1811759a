"""Hang suspicion: what a job's hang says about its GPUs.

A hang alone is no GPU-side evidence (a data-loader deadlock, a SIGSTOP), so it
never takes a GPU out of the pool: it makes the GPU suspect, and placement
avoids suspect GPUs while clean ones are free. A job that has hung on two
different GPUs is itself the cause, and the suspicion it raised is lifted; a
suspect GPU that runs a job for stable_after_s without a hang is cleared.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from gpuguard.events import Event, EventKind
from gpuguard.health.types import Severity


class Suspicion:
    def __init__(self, record: Callable[[Event], Event], index_of: Callable[[str], int]) -> None:
        self._record = record
        self._index = index_of
        self.suspects: dict[str, set[str]] = {}  # GPU uuid -> the jobs that hung on it
        self.hung_on: dict[str, set[str]] = {}  # job -> the GPUs it hung on
        self._busy_since: dict[str, float] = {}  # suspect GPU -> since when a job runs on it

    def hung(self, job: str, uuids: Sequence[str]) -> None:
        seen = self.hung_on.setdefault(job, set())
        seen.update(uuids)
        if len(seen) >= 2:
            for uuid in sorted(seen):
                self.lift(uuid, job, f"job {job} hung on {len(seen)} different GPUs: the job, not the GPU, is the cause")
            return
        for uuid in uuids:
            if job in self.suspects.setdefault(uuid, set()):
                continue
            self.suspects[uuid].add(job)
            self._record(
                Event(
                    kind=EventKind.GPU_SUSPECT, severity=Severity.WARNING, gpu=uuid, job=job,
                    message=f"GPU {self._index(uuid)} is suspect: job {job} hung on it (no GPU-side fault seen); "
                    "jobs go to other GPUs while there are free ones",
                )
            )

    def lift(self, uuid: str, job: str | None, why: str) -> None:
        """Lift one job's suspicion of a GPU (job None: all of it)."""
        held = self.suspects.get(uuid)
        if not held or (job is not None and job not in held):
            return
        if job is None:
            held.clear()
        else:
            held.discard(job)
        if not held:
            del self.suspects[uuid]
            self._busy_since.pop(uuid, None)
            message = f"GPU {self._index(uuid)} is no longer suspect: {why}"
            self._record(Event(kind=EventKind.GPU_SUSPICION_LIFTED, severity=Severity.INFO, gpu=uuid, message=message))

    def forget(self, uuid: str) -> None:
        """The operator's include: no suspicion is left, and no event is needed for it."""
        self.suspects.pop(uuid, None)
        self._busy_since.pop(uuid, None)

    def tick(self, now: float, jobs_on: Callable[[str], list[str]], stable_s: float) -> None:
        """A suspect GPU that runs a job for stable_s without a hang is cleared."""
        for uuid in list(self.suspects):
            if not jobs_on(uuid):
                self._busy_since.pop(uuid, None)
                continue
            since = self._busy_since.setdefault(uuid, now)
            if now - since >= stable_s:
                self.lift(uuid, None, f"a job ran on it for {stable_s:g}s without a hang")
