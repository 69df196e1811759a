"""The daemon stays light: none of its modules imports torch or ultralytics
(those live in gpuguard/integrations/, in the job's process)."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import importlib, pkgutil, sys
import gpuguard
for m in pkgutil.walk_packages(gpuguard.__path__, "gpuguard."):
    if ".integrations" in m.name or m.name.endswith("__main__"):
        continue
    importlib.import_module(m.name)
print(" ".join(sorted(n for n in ("torch", "ultralytics") if n in sys.modules)))
"""


def test_daemon_modules_do_not_import_torch_or_ultralytics() -> None:
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
