"""bench/failover.py, once: every phase of moving a job to another node is seen, in order.

Timings are the benchmark's business (docs/BENCHMARKS.md); this keeps its
measuring from rotting: each mark found where it should be, each after the last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lab.slurm import missing_binaries

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_one_failover_sees_every_phase_in_order(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the loopback cluster needs root (munged as munge, slurmd as root)")
    if missing := missing_binaries():
        pytest.skip(f"Slurm/munge not installed ({', '.join(missing)}): make test-cluster installs them")
    out = tmp_path / "failover.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "failover.py"), "--runs", "1", "--unforced-runs", "0", "--json", str(out)],
        capture_output=True, text=True, timeout=540,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    times = [run[mark] for mark in report["marks"]]
    assert report["marks"][0] == "fault" and report["marks"][-1] == "first_batch"
    assert all(isinstance(t, float) for t in times), run
    assert times == sorted(times), [m for m, _ in sorted(zip(report["marks"], times), key=lambda p: p[1])]
    assert run["stored"] is True and run["fetched_stored_id"] == run["snapshot"]  # n2 resumed from the hand-off's own snapshot
    assert run["begin_reason"] == "BeginTime"  # Slurm held the requeued job back until the bench released it
    assert "fault to the first batch on n2" in result.stdout  # the table
