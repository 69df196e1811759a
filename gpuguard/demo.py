"""`make demo`: gpuguardd on two simulated GPUs, faults injected, what it sees.

Runs the real daemon and the real gpuguardctl as separate processes, in a
throw-away state dir, and prints each step with the times it measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="gpuguard-demo-") as tmp:
        return Demo(Path(tmp)).run()


class Demo:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.socket = tmp / "gpuguard.sock"
        self.config = tmp / "config.toml"
        self.config.write_text("[monitor]\npoll_interval_s = 0.5\nnvml_timeout_s = 0.5\n")

    def ctl(self, *args: str, show: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(BIN / "gpuguardctl"), "--socket", str(self.socket), *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if show:
            print(f"$ gpuguardctl {' '.join(args)}    (exit {result.returncode})")
            print((result.stdout + result.stderr).rstrip() or "(no output)")
            print()
        return result

    def status(self) -> dict[str, Any]:
        return json.loads(self.ctl("status", "--json", show=False).stdout)

    def wait(self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 10.0) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if predicate(self.status()):
                return time.monotonic() - start
            time.sleep(0.02)
        raise SystemExit("demo: the daemon did not react in time (see the log above)")

    def run(self) -> int:
        log = (self.tmp / "gpuguardd.log").open("w")
        daemon = subprocess.Popen(
            [
                str(BIN / "gpuguardd"),
                "--simulate",
                "2",
                "--config",
                str(self.config),
                "--state-dir",
                str(self.tmp / "state"),
                "--socket",
                str(self.socket),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        try:
            return self.steps()
        finally:
            daemon.terminate()
            code = daemon.wait(timeout=20)
            log.close()
            print(f"== gpuguardd stopped with exit {code}; its log (JSON lines, as journald would get them):")
            for line in (self.tmp / "gpuguardd.log").read_text().splitlines()[-12:]:
                print("   ", line[:200])

    def steps(self) -> int:
        print("== 1. gpuguardd --simulate 2: the inventory and health of two simulated GPUs\n")
        start = time.monotonic()
        while not self.socket.exists():
            if time.monotonic() - start > 30:
                raise SystemExit("demo: gpuguardd did not start")
            time.sleep(0.05)
        self.wait(lambda s: s["daemon"]["last_poll_at"] is not None)
        self.ctl("status")

        print("== 2. Xid 79 (GPU has fallen off the bus) on GPU 1, through the kernel-log path\n")
        t0 = time.monotonic()
        self.ctl("inject", "1", "xid", "79")
        took = self.wait(lambda s: s["gpus"][1]["state"] == "faulted")
        print(f"   GPU 1 faulted {1000 * (time.monotonic() - t0):.0f} ms after the inject command started "
              f"(status polled every 20 ms; {1000 * took:.0f} ms after it returned)\n")
        self.ctl("events", "--gpu", "1")
        self.ctl("check")

        print("== 3. A hung NVML call on GPU 0: the daemon keeps answering, the GPU goes unknown\n")
        self.ctl("inject", "0", "nvml-hang", "3")
        self.wait(lambda s: s["gpus"][0]["state"] == "unknown")
        t = time.monotonic()
        self.ctl("status")
        print(f"   status answered in {1000 * (time.monotonic() - t):.0f} ms while NVML hangs on GPU 0\n")
        self.wait(lambda s: s["gpus"][0]["state"] == "healthy", timeout_s=15)
        print("   GPU 0 is back once the call returns\n")

        print("== 4. Quarantine: exclude GPU 0, see what a scheduler may use, include it again\n")
        self.ctl("exclude", "0", "--reason", "demo: fan noise")
        self.ctl("healthy", "--format", "index")
        self.ctl("include", "0")

        print("== 5. Xid 95 (uncontained ECC error) on GPU 0, then a reset\n")
        self.ctl("inject", "0", "xid", "95")
        self.wait(lambda s: s["gpus"][0]["state"] == "faulted")
        self.ctl("reset", "0")
        self.wait(lambda s: s["gpus"][0]["state"] == "healthy")
        self.ctl("status")
        self.ctl("events", "--limit", "12")
        return 0


if __name__ == "__main__":
    sys.exit(main())
