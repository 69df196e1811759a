"""A wedged NVML is a fault (issue #13): a GPU whose NVML calls miss their
deadline for [health] nvml_wedged_after_s is treated as lost; its job is asked
to checkpoint and moves; the GPU stays out until NVML answers again and
probation passes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from harness import running_daemon

pytestmark = pytest.mark.e2e

CONFIG = (
    "[health]\nnvml_wedged_after_s = 1.5\n"
    "[reset]\nprobation_s = 1.0\n"
    "[jobs]\ncheckpoint_grace_s = 2\nstop_timeout_s = 1\n"
)
POLITE = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGUSR1, lambda *_: sys.exit(75))\n"
    "while True:\n    time.sleep(0.05)\n"
)


def test_a_wedged_gpu_moves_its_job_and_returns_after_probation(tmp_path: Path) -> None:
    with running_daemon(tmp_path, extra_config=CONFIG, stop_jobs=["j"]) as d:
        gpu0, gpu1 = d.gpu(0)["uuid"], d.gpu(1)["uuid"]
        (tmp_path / "job.py").write_text(POLITE)
        d.ctl("run", "--name", "j", "--workdir", str(tmp_path), "--", sys.executable, str(tmp_path / "job.py"))
        d.wait_for(lambda s: s["jobs"][0]["gpus"] == [gpu0] and s["jobs"][0]["state"] == "running", what="job on GPU 0")
        d.ctl("inject", "0", "nvml-hang", "5")
        d.wait_for(lambda s: s["jobs"][0]["gpus"] == [gpu1] and s["jobs"][0]["attempt"] == 2, timeout_s=15,
                   what="the job moved off the wedged GPU")  # fmt: skip
        gpu = d.gpu(0)
        assert gpu["state"] == "excluded" and gpu["reason"].startswith("NVML wedged")
        asked = [e for e in d.events("checkpoint_requested") if e["job"] == "j"]
        assert asked and "NVML wedged" in asked[0]["message"]
        stopped = d.events("job_stopping_done")[0]
        assert "exit 75, after the checkpoint signal" in stopped["message"]  # the trainer could still answer
        d.wait_for(lambda s: s["gpus"][0]["state"] == "healthy", timeout_s=20, what="GPU 0 back after probation")
        back = d.events("gpu_included", gpu="0")
        assert back and "NVML answered again" in back[-1]["message"]


def test_an_idle_wedged_gpu_is_excluded_too(tmp_path: Path) -> None:
    """No job needs to be on it: a wedged GPU must not be handed to the next job."""
    with running_daemon(tmp_path, extra_config=CONFIG) as d:
        d.ctl("inject", "1", "nvml-hang", "30")
        d.wait_for(lambda s: s["gpus"][1]["state"] == "excluded", timeout_s=15, what="GPU 1 excluded")
        assert d.gpu(1)["reason"].startswith("NVML wedged")
        assert d.ctl("healthy", "--format", "index").stdout.split() == ["0"]
