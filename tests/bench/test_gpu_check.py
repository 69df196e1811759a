"""bench/gpu_check.py, the real-GPU proof, run on simulated GPUs so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_installs_this_tree_and_passes_in_simulation(tmp_path: Path) -> None:
    """The device run's own entry point, gpu_check.sh: install into a directory of its own, then check."""
    wheels = tmp_path / "no-wheels"  # the carried ones are for the GPU machine's Python
    wheels.mkdir()
    result = subprocess.run(
        [str(REPO / "bench" / "gpu_check.sh"), "--simulate", "1", "--polls", "10"],
        capture_output=True,
        text=True,
        timeout=400,
        env=dict(os.environ, OUT=str(tmp_path), CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable, WHEELS=str(wheels)),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "gpu_check.sh: installed gpuguard from" in result.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    site = Path(report["bin"]).parent
    assert site.name.startswith("gpuguard-site.") and not site.exists()  # used, then removed
    assert report["job"]["final_state"] == "succeeded"
    assert report["job"]["epochs_in_results"] == 3
    assert report["job"]["attempts"] >= 2  # the SIGSTOPped trainer was restarted
    assert report["reset_dry_run"]["exit"] == 0
    assert "gpu_check summary" in result.stdout
