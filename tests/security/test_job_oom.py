"""A job gets an ordinary OOM score, whatever the daemon's own (issue #14).

The unit gives gpuguardd OOMScoreAdjust=-500 so the OOM killer spares it; a
job that inherited it would be spared too, and a trainer with big host-RAM
loaders would outlive sshd and slurmd. The "daemon" here is a subprocess that
sets its own score first, so pytest's stays as it was. Lowering a score
takes CAP_SYS_RESOURCE, which some sandboxes drop even for root; raising one
does not, so a daemon score above 0 is checked everywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


pytestmark = [
    pytest.mark.e2e, pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to lower a score and start jobs as nobody"),
]

CAP_SYS_RESOURCE = 24


def _may_lower_scores() -> bool:
    caps = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("CapEff:"))
    return bool(int(caps.split()[1], 16) >> CAP_SYS_RESOURCE & 1)


# The job (a shell: the test's interpreter may be one nobody cannot run)
# reads its score, then tries to take the daemon's back.
JOB = """
echo "score=$(cat /proc/self/oom_score_adj)"
if (echo -500 > /proc/self/oom_score_adj) 2>/dev/null; then echo lowered=yes; else echo lowered=no; fi
"""
DAEMON = """
import json, sys
from pathlib import Path
from gpuguard.supervisor.process import UserSpec, spawn
tmp, job_script, score = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
with open("/proc/self/oom_score_adj", "w") as f:
    f.write(score)
job = spawn(["/bin/sh", "-c", job_script], env={"PATH": "/usr/bin:/bin"}, cwd=tmp,
            user=UserSpec.lookup("nobody"), log_path=tmp / "job.log")
wrapper = Path(f"/proc/{job.pid}/oom_score_adj").read_text().strip()
print(json.dumps({"code": job.wait(20), "wrapper": int(wrapper)}))
"""


@pytest.mark.parametrize(
    "daemon_score",
    [
        pytest.param(-500, marks=pytest.mark.skipif(not _may_lower_scores(), reason="no CAP_SYS_RESOURCE here")),
        300,
    ],
)
def test_a_job_as_nobody_runs_with_score_0_and_cannot_lower_it(open_dir: Path, daemon_score: int) -> None:  # noqa: F811
    """The job reads 0 and cannot take -500 for itself; the root wrapper keeps the daemon's score."""
    out = subprocess.run(
        [sys.executable, "-c", DAEMON, str(open_dir), JOB, str(daemon_score)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.splitlines()[-1])
    log = (open_dir / "job.log").read_text()
    assert report == {"code": 0, "wrapper": daemon_score}, log
    assert "score=0\n" in log
    assert "lowered=no" in log
