"""bench/gpu_check.py, the real-GPU proof, run on simulated GPUs so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_passes_in_simulation(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--simulate", "1", "--polls", "10"],
        capture_output=True,
        text=True,
        timeout=400,
        env=dict(os.environ, OUT=str(tmp_path), CUDA_VISIBLE_DEVICES=""),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["job"]["final_state"] == "succeeded"
    assert report["job"]["epochs_in_results"] == 3
    assert report["job"]["attempts"] >= 2  # the SIGSTOPped trainer was restarted
    assert report["reset_dry_run"]["exit"] == 0
    assert "gpu_check summary" in result.stdout
