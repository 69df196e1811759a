"""The short chaos run (bench/chaos.py, fixed seed, about 40 s): 4 simulated GPUs,
4 misbehaving trainer jobs, and every invariant holds.

It covers every shape but the full disk (that one mounts a tmpfs, so it runs
only with --disk-full or --long): each fault class is scheduled once (Xids,
ECC, remaps, lost GPUs, NVML blips and a 4 s NVML wedge, hangs, crashes,
truncated checkpoints, daemon SIGKILLs, a SIGKILL with the `escape` job's
grandchild escaping, a corrupted database) and is injected when it has a
target then; the jobs bring their own exit-75 loop (`loop` reaches its
max_restarts), a missing checkpoint handler (`nohandler`) and a deaf one;
the healer's reset and include after repair. Wedged GPUs come back through
probation and corrupted databases are rebuilt; both are checked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness import running_daemon

pytestmark = pytest.mark.e2e

CHAOS = Path(__file__).resolve().parents[2] / "bench" / "chaos.py"
TRAINER = Path(__file__).resolve().parents[1] / "supervisor" / "jobs" / "trainer.py"


@pytest.mark.timeout(240)
@pytest.mark.slow
def test_short_chaos_run_holds_every_invariant(capsys: pytest.CaptureFixture[str]) -> None:
    done = subprocess.run(
        [sys.executable, str(CHAOS), "--seed", "7", "--duration", "40"], capture_output=True, text=True, timeout=230
    )
    with capsys.disabled():
        print("\n" + done.stdout[-5000:])
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "no job lost                                   yes" in done.stdout


def test_a_job_in_backoff_is_not_listed_on_the_gpu_another_job_took(tmp_path: Path) -> None:
    """Regression (found by the chaos run): a crashed job in backoff kept its GPU as a
    preference, another job started there, and status listed the GPU under both jobs."""
    try:
        with running_daemon(tmp_path, gpus=1, extra_config="[jobs]\nbackoff_initial_s = 30\nbackoff_max_s = 30\n") as d:
            for name, flags in (("crashes", ["--crash"]), ("steady", [])):
                work = tmp_path / name
                work.mkdir()
                d.ctl("run", "--name", name, "--workdir", str(work), "--", sys.executable, str(TRAINER), *flags)
                if name == "crashes":
                    d.wait_for(lambda s: s["jobs"][0]["state"] == "backoff", timeout_s=10, what="the crash and its backoff")
            d.wait_for(lambda s: any(j["name"] == "steady" and j["state"] == "running" for j in s["jobs"]), timeout_s=10, what="steady running")
            assert d.gpu(0)["jobs"] == ["steady"]
    finally:
        for line in (tmp_path / "steady" / "attempts.jsonl").read_text().splitlines():
            try:
                os.kill(json.loads(line)["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
