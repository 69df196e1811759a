"""`make demo`: a real YOLO training survives its GPU falling off the bus.

gpuguardd runs on two simulated GPUs; a tiny YOLO trains on the CPU as a
gpuguard job; after its first epoch, Xid 79 is injected on the job's GPU
through the kernel-log path. gpuguard detects it, asks the trainer to
checkpoint, excludes the GPU, and restarts the training on the other GPU from
the checkpoint; it completes every epoch. Then a short tour of the other
faults. Everything runs as separate processes (gpuguardd, gpuguardctl,
gpuguard-yolo), in a throw-away directory, and every time printed is measured.
"""

from __future__ import annotations

import argparse
import codecs
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
EPOCHS = 4
TRAIN_IMAGES = 96  # 12 batches of 8: an epoch lasts long enough for the fault to land inside one
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
LINE_MAX = 160  # the trainer's settings line alone runs to thousands of characters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpuguard-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="run in this directory and keep it (default: a temp dir)")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    args = parser.parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        return Demo(args.keep.resolve(), args.epochs).run()
    with tempfile.TemporaryDirectory(prefix="gpuguard-demo-") as tmp:
        return Demo(Path(tmp), args.epochs).run()


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def make_dataset(dest: Path) -> Path:
    """The tiny YOLO dataset, made on the fly; returns its data.yaml."""
    subprocess.run(
        [str(BIN / "gpuguard-yolo"), "make-dataset", str(dest), "--train", str(TRAIN_IMAGES)],
        check=True,
        capture_output=True,
    )
    return dest / "data.yaml"


def train_command(data_yaml: Path, project: Path, epochs: int) -> list[str]:
    """The demo's training (yolov8n on the CPU); it writes to PROJECT/demo/."""
    return [
        str(BIN / "gpuguard-yolo"), "train", "model=yolov8n.yaml", f"data={data_yaml}", f"epochs={epochs}",
        "imgsz=64", "batch=8", "workers=0", f"project={project}", "name=demo", "plots=False", "val=True",
    ]  # fmt: skip


def results_epochs(results_csv: Path) -> list[int]:
    """The epochs Ultralytics recorded in results.csv, one row per finished epoch."""
    rows = list(csv.DictReader(results_csv.open()))
    return [int(float(r["epoch"].strip() if "epoch" in r else r[next(iter(r))])) for r in rows]


class LogTail:
    """The lines a growing file gained since the last call: the trainer's output
    (progress bars update with \\r, so \\r ends a line too; colours dropped)."""

    def __init__(self, path: Path, prefix: str) -> None:
        self.path = path
        self.prefix = prefix
        self._offset = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._partial = ""  # text after the last line end

    def new_lines(self) -> list[str]:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:  # the job has not started yet
            return []
        self._offset += len(data)
        *done, self._partial = re.split(r"[\r\n]", self._partial + self._decoder.decode(data))
        lines = (ANSI.sub("", segment).rstrip() for segment in done)
        return [self.prefix + (s if len(s) <= LINE_MAX else s[: LINE_MAX - 1] + "…") for s in lines if s.strip()]


class Demo:
    def __init__(self, tmp: Path, epochs: int) -> None:
        self.tmp = tmp
        self.epochs = epochs
        self.run_dir = tmp / "run"
        self.run_dir.mkdir(exist_ok=True)
        self.socket = self.run_dir / "gpuguard.sock"
        self.config = tmp / "config.toml"
        self.config.write_text(
            "[monitor]\npoll_interval_s = 0.5\nnvml_timeout_s = 0.5\n"
            "[jobs]\ncheckpoint_grace_s = 30\nstop_timeout_s = 10\n"
        )
        self.trainer = LogTail(tmp / "state" / "jobs" / "yolo" / "output.log", "   [yolo] ")

    # --- helpers -------------------------------------------------------
    def ctl(self, *args: str, show: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(BIN / "gpuguardctl"), "--socket", str(self.socket), *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if show:
            print(f"$ gpuguardctl {' '.join(args)}")
            print((result.stdout + result.stderr).rstrip() or "(no output)")
            print()
        return result

    def status(self) -> dict[str, Any]:
        return json.loads(self.ctl("status", "--json", show=False).stdout)

    def events(self, job: str | None = None) -> list[dict[str, Any]]:
        args = ["events", "--json", "--limit", "500"] + (["--job", job] if job else [])
        return json.loads(self.ctl(*args, show=False).stdout)

    def wait(self, predicate: Callable[[], Any], what: str, timeout_s: float = 180.0) -> Any:
        """Poll until predicate() holds, printing the trainer's new lines meanwhile."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = predicate()
            for line in self.trainer.new_lines():
                print(line, flush=True)
            if value:
                return value
            time.sleep(0.05)
        raise SystemExit(f"demo: timed out waiting for {what}; the daemon log is {self.tmp / 'gpuguardd.log'}")

    def job(self) -> dict[str, Any] | None:
        return next((j for j in self.status()["jobs"] if j["name"] == "yolo"), None)

    # --- the run -------------------------------------------------------
    def run(self) -> int:
        log = (self.tmp / "gpuguardd.log").open("w")
        daemon = subprocess.Popen(
            [str(BIN / "gpuguardd"), "--simulate", "2", "--config", str(self.config),
             "--state-dir", str(self.tmp / "state"), "--socket", str(self.socket)],
            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )  # fmt: skip
        try:
            self.wait(lambda: self.socket.exists() and self.ctl("status", show=False).returncode == 0, "gpuguardd")
            code = self.yolo()
            self.tour()
            return code
        finally:
            self.ctl("stop", "yolo", show=False)
            daemon.terminate()
            daemon.wait(timeout=30)
            log.close()

    def yolo(self) -> int:
        print("== 1. gpuguardd --simulate 2, and a tiny YOLO dataset made on the fly\n")
        data_yaml = make_dataset(self.tmp / "data")
        self.ctl("status")

        print(f"== 2. A real YOLO training ({self.epochs} epochs, yolov8n, CPU) as a gpuguard job\n")
        project = self.tmp / "runs"
        self.ctl("run", "--name", "yolo", "--workdir", str(self.tmp), "--", *train_command(data_yaml, project, self.epochs))
        print("   waiting for the first epoch's checkpoint (gpuguard validates and keeps a copy) ...")
        self.wait(lambda: any(e["kind"] == "snapshot_saved" for e in self.events("yolo")), "the first checkpoint")
        # the fault must land while the job still trains (an epoch of the tiny set takes a
        # second or two): one status call, then the fault; the tables come after it
        status = self.status()
        job = next(j for j in status["jobs"] if j["name"] == "yolo")
        index = next(g["index"] for g in status["gpus"] if g["uuid"] == job["gpus"][0])

        print(f"== 3. Xid 79 (GPU has fallen off the bus) on GPU {index}, the job's GPU\n")
        heartbeat = self.run_dir / "jobs" / "yolo" / "heartbeat"
        t_fault = time.time()
        self.ctl("inject", str(index), "xid", "79")
        restarted = self.wait(
            lambda: next((e for e in self.events("yolo") if e["kind"] == "job_restarted"), None), "the restart"
        )
        t_restart = _ts(restarted["ts"])
        t_first_batch = self.wait(
            lambda: heartbeat.exists() and heartbeat.stat().st_mtime > t_restart and heartbeat.stat().st_mtime,
            "the first batch after the resume",
        )
        print(f"   {restarted['message']}\n")
        final = self.wait(
            lambda: (j := self.job()) and j["state"] in ("succeeded", "failed") and j, "the end of training", 600
        )
        events = self.events()
        after = [e for e in events if _ts(e["ts"]) >= t_fault - 0.5]

        def first(kind: str, job: str | None = None) -> float | None:
            return next((_ts(e["ts"]) for e in after if e["kind"] == kind and (job is None or e["job"] == job)), None)

        timeline = [
            ("fault injected (kernel-log record written)", t_fault),
            ("detected: GPU excluded, checkpoint asked for", first("gpu_excluded")),
            ("checkpoint saved, trainer exited 75", first("job_stopping_done", "yolo")),
            ("training restarted on the other GPU", t_restart),
            ("first training batch after the resume", t_first_batch),
        ]
        print("== 4. Recovery timeline (measured)\n")
        for label, t in timeline:
            print(f"   {'+' + format(1000 * (t - t_fault), '.0f') + ' ms' if t else 'not seen':>10}  {label}")
        print()
        epochs = results_epochs(project / "demo" / "results.csv")
        print(f"   results.csv epochs: {epochs} (requested {self.epochs}); job {final['state']} "
              f"after {final['attempt']} attempts, resumed from {restarted.get('resume_from') or 'a snapshot'}\n")
        self.ctl("events", "--job", "yolo")
        self.ctl("status")
        ok = final["state"] == "succeeded" and epochs == list(range(1, self.epochs + 1))
        print("== the training completed every epoch after the fault\n" if ok else "== the training did NOT complete\n")
        return 0 if ok else 1

    def tour(self) -> None:
        print("== 5. Other faults, briefly\n")
        self.ctl("include", "0", show=False)
        self.ctl("include", "1", show=False)
        gpus = self.status()["gpus"]
        healthy = next(g["index"] for g in gpus if g["state"] == "healthy")
        self.ctl("inject", str(healthy), "nvml-hang", "3")
        self.wait(lambda: self.status()["gpus"][healthy]["state"] == "unknown", "the hung GPU going unknown", 10)
        t = time.monotonic()
        self.ctl("status")
        print(f"   status answered in {1000 * (time.monotonic() - t):.0f} ms while NVML hangs on GPU {healthy}\n")
        self.ctl("check")
        self.ctl("healthy", "--format", "cuda")


if __name__ == "__main__":
    sys.exit(main())
