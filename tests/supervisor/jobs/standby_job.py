"""A job that may be a warm standby, for tests/supervisor/test_standby*.py.

It appends one JSON line per phase to `standby.jsonl` in its cwd: "imported"
when it starts (its CUDA_VISIBLE_DEVICES, GPUGUARD_ATTEMPT and GPUGUARD_STANDBY
as given), then "told" once `gpuguard.job.wait_until_started()` returns (what it
was handed). Then it touches GPUGUARD_HEARTBEAT every 0.1 s (which lets the
daemon start its standby at once) and exits 75 on the checkpoint signal.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from gpuguard.job import wait_until_started

LOG = "standby.jsonl"


def note(phase: str) -> None:
    env = os.environ
    line = {
        "phase": phase,
        "pid": os.getpid(),
        "t": time.time(),
        "cvd": env.get("CUDA_VISIBLE_DEVICES"),
        "attempt": env.get("GPUGUARD_ATTEMPT"),
        "standby": env.get("GPUGUARD_STANDBY"),
        "resume": env.get("GPUGUARD_RESUME_FROM"),
        "nvml_check": env.get("PYTORCH_NVML_BASED_CUDA_CHECK"),
    }
    with open(LOG, "a") as f:
        f.write(json.dumps(line) + "\n")


def main() -> None:
    signal.signal(signal.SIGUSR1, lambda *_: sys.exit(75))
    note("imported")
    wait_until_started()
    note("told")
    heartbeat = Path(os.environ["GPUGUARD_HEARTBEAT"])
    while True:
        heartbeat.touch()
        time.sleep(0.1)


if __name__ == "__main__":
    main()
