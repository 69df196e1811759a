"""A job's own hang is not a GPU fault (issue #13): it makes the GPU suspect,
never excluded; the job restarts on another GPU when there is one; a job that
hangs on two different GPUs is itself the cause; a suspect GPU that runs a job
for stable_after_s is cleared."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from harness import DaemonProc, running_daemon

pytestmark = pytest.mark.e2e

FAST = (
    "hang_timeout_s = 1.0\nhang_startup_timeout_s = 1.0\n"
    "[jobs]\ncheckpoint_grace_s = 0.5\nstop_timeout_s = 0.5\nmax_restarts = 10\nbackoff_initial_s = 0.1\nstable_after_s = 2.0\n"
)
SILENT = "import time\ntime.sleep(300)\n"  # no heartbeat, no CPU: a hang once the limit passes
# hangs in its first attempt only, then heartbeats: a data-loader deadlock that a restart cures
ONCE = (
    "import os, pathlib, time\n"
    "hb = pathlib.Path(os.environ['GPUGUARD_HEARTBEAT'])\n"
    "if os.environ['GPUGUARD_ATTEMPT'] == '1':\n"
    "    time.sleep(300)\n"
    "while True:\n"
    "    hb.touch()\n"
    "    time.sleep(0.1)\n"
)


def run(d: DaemonProc, tmp_path: Path, name: str, script: str) -> None:
    path = tmp_path / f"{name}.py"
    path.write_text(script)
    d.ctl("run", "--name", name, "--workdir", str(tmp_path), "--", sys.executable, str(path))


def test_a_job_that_hangs_on_two_gpus_is_the_cause_and_no_gpu_is_excluded(tmp_path: Path) -> None:
    with running_daemon(tmp_path, extra_config=FAST, stop_jobs=["stuck"]) as d:
        gpu0, gpu1 = d.gpu(0)["uuid"], d.gpu(1)["uuid"]
        run(d, tmp_path, "stuck", SILENT)
        d.wait_for(lambda s: s["gpus"][0]["suspect"] == ["stuck"], timeout_s=20, what="GPU 0 suspect")
        d.wait_for(lambda s: d.job("stuck")["gpus"] == [gpu1], timeout_s=20, what="the restart on GPU 1")
        d.wait_for(lambda s: d.events("gpu_suspicion_lifted"), timeout_s=20, what="the second hang")
        status = d.status()
        assert [g["state"] for g in status["gpus"]] == ["healthy", "healthy"]
        assert [g["suspect"] for g in status["gpus"]] == [[], []]
        kinds = d.kinds()
        assert kinds.count("hang") >= 2 and "gpu_excluded" not in kinds
        lifted = d.events("gpu_suspicion_lifted")[0]
        assert lifted["gpu"] == gpu0 and "the job, not the GPU" in lifted["message"]


def test_a_suspect_gpu_is_avoided_then_cleared_by_a_stable_run(tmp_path: Path) -> None:
    with running_daemon(tmp_path, extra_config=FAST, stop_jobs=["once", "next"]) as d:
        gpu0, gpu1 = d.gpu(0)["uuid"], d.gpu(1)["uuid"]
        run(d, tmp_path, "once", ONCE)
        d.wait_for(lambda s: s["gpus"][0]["suspect"] == ["once"], timeout_s=20, what="GPU 0 suspect")
        d.wait_for(lambda s: d.job("once")["gpus"] == [gpu1] and d.job("once")["state"] == "running", timeout_s=20,
                   what="the restart on the clean GPU")  # fmt: skip
        run(d, tmp_path, "next", ONCE.replace("== '1'", "== 'never'"))  # heartbeats from the start
        d.wait_for(lambda s: d.job("next")["gpus"] == [gpu0], what="the only free GPU, suspect or not")
        d.wait_for(lambda s: s["gpus"][0]["suspect"] == [], timeout_s=20, what="the suspicion lifted by a stable run")
        lifted = d.events("gpu_suspicion_lifted")[0]
        assert "without a hang" in lifted["message"]
        assert d.gpu(0)["state"] == "healthy"
