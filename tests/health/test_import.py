"""The health rules stay pure: importing them pulls in neither NVML nor torch."""

from __future__ import annotations

import subprocess
import sys


def test_health_imports_no_nvml_or_torch() -> None:
    code = (
        "import sys, gpuguard.health, gpuguard.health.rules, gpuguard.health.xid\n"
        "gpuguard.health.xid.catalog()\n"
        "bad = sorted(m for m in ('pynvml', 'torch', 'ultralytics') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30)
    assert out.stdout.strip() == ""
