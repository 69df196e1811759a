"""A job with a process that escapes it: a new session, reparented away, no trace in its
environment. Used by test_cgroup (the job's cgroup, in-process) and test_cgroup_e2e (a real
gpuguardd); the fixture needs_cgroup is in tests/supervisor/conftest.py."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

SLEEP = shutil.which("sleep") or "/bin/sleep"

# The job: its child starts a new session and forks the escapee, then exits, so the escapee is
# reparented away (to init: pytest is no subreaper). The escapee ignores SIGTERM and execs with
# an empty environment: no GPUGUARD_WRAPPER_PID leads back to the job. The job's main process
# ignores SIGTERM too, so the stop reaches its kill phase.
ESCAPING_JOB = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
middle = os.fork()
if middle == 0:
    os.setsid()
    escapee = os.fork()
    if escapee == 0:
        os.execve({sleep!r}, ["sleep", "60"], {{}})
    with open({pidfile!r} + ".tmp", "w") as f:
        f.write(str(escapee))
    os.rename({pidfile!r} + ".tmp", {pidfile!r})
    os._exit(0)
os.waitpid(middle, 0)
print("ready", flush=True)
time.sleep(60)
"""


def escaping_job(tmp: Path) -> tuple[str, Path]:
    """The job's script and the file where it writes the escapee's pid."""
    pidfile = tmp / "escapee.pid"
    return textwrap.dedent(ESCAPING_JOB.format(sleep=SLEEP, pidfile=str(pidfile))), pidfile
