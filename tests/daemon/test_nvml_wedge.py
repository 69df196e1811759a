"""A wedged NVML is a fault (issue #13): a GPU whose NVML calls miss their
deadline for [health] nvml_wedged_after_s is treated as lost; its job is asked
to checkpoint and moves; the GPU stays out until NVML answers again and
probation passes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from harness import DaemonProc

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
    d = DaemonProc(tmp_path, extra_config=CONFIG)
    d.start()
    try:
        gpu0, gpu1 = d.gpu(0)["uuid"], d.gpu(1)["uuid"]
        (tmp_path / "job.py").write_text(POLITE)
        d.ctl("run", "--name", "j", "--workdir", str(tmp_path), "--", sys.executable, str(tmp_path / "job.py"))
        d.wait_for(lambda s: s["jobs"][0]["gpus"] == [gpu0] and s["jobs"][0]["state"] == "running", what="job on GPU 0")
        d.ctl("inject", "0", "nvml-hang", "5")
        d.wait_for(lambda s: s["jobs"][0]["gpus"] == [gpu1] and s["jobs"][0]["attempt"] == 2, timeout_s=15,
                   what="the job moved off the wedged GPU")  # fmt: skip
        gpu = d.gpu(0)
        assert gpu["state"] == "excluded" and gpu["reason"].startswith("NVML wedged")
        events = json.loads(d.ctl("events", "--json", "--limit", "500").stdout)
        asked = [e for e in events if e["kind"] == "checkpoint_requested" and e["job"] == "j"]
        assert asked and "NVML wedged" in asked[0]["message"]
        stopped = next(e for e in events if e["kind"] == "job_stopping_done")
        assert "exit 75, after the checkpoint signal" in stopped["message"]  # the trainer could still answer
        d.wait_for(lambda s: s["gpus"][0]["state"] == "healthy", timeout_s=20, what="GPU 0 back after probation")
        back = [e for e in json.loads(d.ctl("events", "--json", "--gpu", "0").stdout) if e["kind"] == "gpu_included"]
        assert back and "NVML answered again" in back[-1]["message"]
    finally:
        d.ctl("stop", "j", check=False)
        d.stop()


def test_an_idle_wedged_gpu_is_excluded_too(tmp_path: Path) -> None:
    """No job needs to be on it: a wedged GPU must not be handed to the next job."""
    d = DaemonProc(tmp_path, extra_config=CONFIG)
    d.start()
    try:
        d.ctl("inject", "1", "nvml-hang", "30")
        d.wait_for(lambda s: s["gpus"][1]["state"] == "excluded", timeout_s=15, what="GPU 1 excluded")
        assert d.gpu(1)["reason"].startswith("NVML wedged")
        assert d.ctl("healthy", "--format", "index").stdout.split() == ["0"]
    finally:
        d.stop()
