"""Bench-only: log every training batch, and hold the trainer at the fault point.

The same callback goes into both trainers (the baseline's train_retry.py and
gpuguard-yolo), so lost work and "first batch after the resume" are counted
the same way. Each batch end appends `UNIX_TIME PID EPOCH BATCH` (1-based) to
$BENCH_BATCH_LOG. When $BENCH_FAULT_AT is `EPOCH:BATCH` and $BENCH_FAULT_FILE
does not exist yet, the trainer waits at that batch end until the benchmark
has injected the fault and created the file: the fault then lands exactly
there, whatever the benchmark's polling delay. With $BENCH_STUCK=1 it then
(attempt 1 only) stays there for good, in `time.sleep` (a C call that releases the GIL, as a
call into a GPU that is gone does): a trainer that can no longer answer.

Run as a script it is `gpuguard-yolo train ...` with this callback added:
    python bench/batchlog.py KEY=VALUE ...
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any


class BatchLog:
    def __init__(self, path: Path, fault_at: tuple[int, int] | None, fault_file: Path | None) -> None:
        self.path = path
        self.fault_at = fault_at
        self.fault_file = fault_file
        self.epoch = self.batch = 0

    @classmethod
    def from_env(cls) -> BatchLog:
        fault = os.environ.get("BENCH_FAULT_AT")
        fault_file = os.environ.get("BENCH_FAULT_FILE")
        return cls(
            Path(os.environ["BENCH_BATCH_LOG"]),
            tuple(int(x) for x in fault.split(":")) if fault else None,  # type: ignore[arg-type]
            Path(fault_file) if fault_file else None,
        )

    def on_train_epoch_start(self, trainer: Any) -> None:
        self.batch = 0

    def log(self, trainer: Any) -> None:
        """Before gpuguard's own callback, so a batch after which it exits is counted too."""
        self.batch += 1
        self.epoch = trainer.epoch + 1
        with self.path.open("a") as f:
            f.write(f"{time.time():.6f} {os.getpid()} {self.epoch} {self.batch}\n")

    def hold(self, trainer: Any) -> None:
        """After gpuguard's callback: wait here at the fault batch until the fault is in place."""
        if self.fault_at == (self.epoch, self.batch) and self.fault_file is not None:
            deadline = time.monotonic() + 120
            while not self.fault_file.exists() and time.monotonic() < deadline:
                time.sleep(0.005)
            # the resumed attempt counts its batches from its resume point: it may pass here again
            while os.environ.get("BENCH_STUCK") == "1" and os.environ.get("GPUGUARD_ATTEMPT") == "1":
                time.sleep(3600)


def attach_log(model: Any, log: BatchLog) -> None:
    model.add_callback("on_train_epoch_start", log.on_train_epoch_start)
    model.add_callback("on_train_batch_end", log.log)


def attach(model: Any) -> None:
    """Both callbacks, for a trainer without gpuguard's."""
    log = BatchLog.from_env()
    attach_log(model, log)
    model.add_callback("on_train_batch_end", log.hold)


def guarded_main(argv: list[str]) -> int:
    """gpuguard-yolo train, its callbacks between the batch log and the hold."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from gpuguard.integrations import guard, ultralytics

    install = guard.TrainerGuard.install

    def install_and_log(self: guard.TrainerGuard, model: Any) -> None:
        log = BatchLog.from_env()
        attach_log(model, log)
        install(self, model)
        model.add_callback("on_train_batch_end", log.hold)

    guard.TrainerGuard.install = install_and_log  # type: ignore[method-assign]
    return ultralytics.main(["train", *argv])


if __name__ == "__main__":
    sys.exit(guarded_main(sys.argv[1:]))
