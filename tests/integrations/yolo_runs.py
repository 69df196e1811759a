"""Running gpuguard-yolo as gpuguard would, for the trainer tests: a tiny YOLO on the CPU in
subprocesses, with test-only hooks (the shims) enabled by variables. Shared by
test_ultralytics, test_rng_resume and test_hostcopy; imported as
`from tests.integrations.yolo_runs import ...`."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness import wait_until

TRAIN_ARGS = ("model=yolov8n.yaml", "epochs=2", "imgsz=64", "batch=8", "plots=False", "seed=0")
EX_TEMPFAIL = 75

# TRAINED_LOG (both shims): every training batch appends [epoch, image names] to that file, as the
# trainer sees it.
TRAINED_LOG_HOOK = """
if "TRAINED_LOG" in os.environ:
    from ultralytics.models.yolo.detect import DetectionTrainer
    preprocess = DetectionTrainer.preprocess_batch
    def preprocess_batch(self, batch):
        with open(os.environ["TRAINED_LOG"], "a") as f:
            f.write(json.dumps([self.epoch, [Path(p).name for p in batch["im_file"]]]) + "\\n")
        return preprocess(self, batch)
    DetectionTrainer.preprocess_batch = preprocess_batch
"""

# Runs the trainer with two test-only hooks, each enabled by its variable:
# SLOW_WRITE_MARKER: the first chunk written to last.pt's temp file, once a last.pt exists, stops
#   half-way and says so in that file; the test then SIGKILLs the process mid-write.
# SIGNAL_AT_EPOCH: the process sends itself SIGUSR1 when that (0-based) epoch starts, so the
#   checkpoint lands after its first batch however fast the machine is.
# TRAINED_LOG: every training batch appends [epoch, image names] to that file, as the trainer sees it.
# STATE_LOG: at the training start, appends [optimizer states, EMA updates] to that file.
# KILL_AFTER: "EPOCH:BATCH" (1-based): the process SIGKILLs itself at that batch end, after gpuguard's
#   callbacks (a fault the trainer cannot answer).
SHIM = """
import json, os, signal, sys, time
from pathlib import Path
if "SLOW_WRITE_MARKER" in os.environ:
    marker = Path(os.environ["SLOW_WRITE_MARKER"])
    real_write = os.write
    def write(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target.endswith("/.last.pt.partial") and Path(target).with_name("last.pt").exists():
            real_write(fd, bytes(data[: len(data) // 2]))
            marker.write_text(target)
            time.sleep(120)
        return real_write(fd, data)
    os.write = write
if "SIGNAL_AT_EPOCH" in os.environ:
    from gpuguard.integrations.guard import TrainerGuard
    epoch_start = TrainerGuard.on_train_epoch_start
    def on_train_epoch_start(self, trainer):
        epoch_start(self, trainer)
        if trainer.epoch == int(os.environ["SIGNAL_AT_EPOCH"]):
            os.kill(os.getpid(), signal.SIGUSR1)
    TrainerGuard.on_train_epoch_start = on_train_epoch_start
""" + TRAINED_LOG_HOOK + """if "STATE_LOG" in os.environ:
    from gpuguard.integrations.guard import TrainerGuard
    train_start = TrainerGuard.on_train_start
    def on_train_start(self, trainer):
        train_start(self, trainer)
        with open(os.environ["STATE_LOG"], "a") as f:
            f.write(json.dumps([len(trainer.optimizer.state), trainer.ema.updates]) + "\\n")
    TrainerGuard.on_train_start = on_train_start
if "KILL_AFTER" in os.environ:
    from gpuguard.integrations.guard import TrainerGuard
    install = TrainerGuard.install
    def install_then_kill(self, model):
        install(self, model)
        epoch, batch = map(int, os.environ["KILL_AFTER"].split(":"))
        def kill(trainer):
            if (trainer.epoch + 1, self._batch) == (epoch, batch):
                os.kill(os.getpid(), signal.SIGKILL)
        model.add_callback("on_train_batch_end", kill)
    TrainerGuard.install = install_then_kill
from gpuguard.integrations.ultralytics import main
sys.exit(main())
"""


@dataclass
class Job:
    """One supervised training job: the same command each attempt, as gpuguard runs it."""

    root: Path
    data_yaml: Path
    base_env: dict[str, str]
    logs: list[str] = field(default_factory=list)

    @property
    def save_dir(self) -> Path:
        return self.root / "runs" / "job"

    @property
    def last(self) -> Path:
        return self.save_dir / "weights" / "last.pt"

    @property
    def heartbeat(self) -> Path:
        return self.root / "rt" / "heartbeat"

    @property
    def checkpoint_file(self) -> Path:
        return self.root / "rt" / "checkpoint-path"

    def start(
        self,
        attempt: int,
        resume_from: Path | None = None,
        script: Path | None = None,
        flags: tuple[str, ...] = (),
        extra_args: tuple[str, ...] = (),
        **extra_env: str,
    ) -> subprocess.Popen[str]:
        (self.root / "rt").mkdir(exist_ok=True)
        env = {
            **self.base_env,
            **extra_env,
            "GPUGUARD_JOB": "job",
            "GPUGUARD_ATTEMPT": str(attempt),
            "GPUGUARD_CHECKPOINT_SIGNAL": "SIGUSR1",
            "GPUGUARD_HEARTBEAT": str(self.heartbeat),
            "GPUGUARD_CHECKPOINT_FILE": str(self.checkpoint_file),
        }
        if resume_from is not None:
            env["GPUGUARD_RESUME_FROM"] = str(resume_from)
        entry = [str(script)] if script else ["-m", "gpuguard.integrations.ultralytics"]
        args = [f"data={self.data_yaml}", f"project={self.root / 'runs'}", "name=job", *TRAIN_ARGS, *extra_args]
        log = self.root / f"attempt{len(self.logs) + 1}.log"
        self.logs.append(str(log))
        with log.open("w") as out:
            return subprocess.Popen(
                [sys.executable, *entry, "train", *flags, *args], env=env, cwd=self.root, stdout=out, stderr=subprocess.STDOUT
            )

    def finish(self, proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str]:
        rc = proc.wait(timeout=timeout)
        return rc, Path(self.logs[-1]).read_text(errors="replace")

    def run(self, attempt: int, resume_from: Path | None = None) -> tuple[int, str]:
        return self.finish(self.start(attempt, resume_from))


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str], timeout: float = 60) -> None:
    """wait_until the condition holds, failing at once if the trainer exits first."""

    def holds() -> bool:
        if condition():
            return True
        assert proc.poll() is None, f"trainer exited early with {proc.returncode}"
        return False

    wait_until(holds, timeout, f"{getattr(condition, '__self__', condition)} while the trainer runs", interval=0.02)


def result_epochs(save_dir: Path) -> list[int]:
    lines = (save_dir / "results.csv").read_text().splitlines()[1:]
    return [int(float(line.split(",")[0])) for line in lines]


def trained_per_epoch(log: Path) -> tuple[int, dict[int, list[str]]]:
    """(batches logged, image names per epoch) from a TRAINED_LOG file."""
    lines = log.read_text().splitlines()
    per_epoch: dict[int, list[str]] = {}
    for epoch, names in map(json.loads, lines):
        per_epoch.setdefault(epoch, []).extend(names)
    return len(lines), per_epoch


# the exact-resume runs (test_rng_resume, test_hostcopy)
EXACT_ARGS = ("nbs=16", "workers=0", "deterministic=True")
# a host copy at every optimizer step, whatever it costs on this machine: what a stuck trainer loses is then
# the batch in flight, not a count that depends on timing (bench/hostcopy.py measures the default budget)
EXACT_FLAGS = ("--copy-budget", "inf")
INTERRUPTIONS = ({"SIGNAL_AT": "1:3"}, {"STUCK_AT": "2:3"}, {})  # attempt by attempt

# Test-only hooks, each enabled by its variable ("E:B" = 1-based epoch and batch):
# FINAL_STATE: at the end of training, torch.save the trainer's weights, EMA and optimizer state there.
# SIGNAL_AT: the process sends itself SIGUSR1 as batch B of epoch E starts (it answers at that batch's end).
# STUCK_AT: as batch B of epoch E starts, SIGUSR1 to itself, then the main thread blocks in time.sleep
#   (a C call that releases the GIL, as a call into a dead GPU does) and never comes back.
# BLOCK_AT: the same block, without the signal.
# TRAINED_LOG: every training batch appends [epoch, image names] to that file.
# HOST_MEMORY_SHORT: every host buffer a host copy asks for is refused (MemoryError).
EXACT_SHIM = """
import json, os, signal, sys, time
from pathlib import Path
if "HOST_MEMORY_SHORT" in os.environ:
    import gpuguard.integrations.hostcopy as hostcopy
    def refused(src):
        raise MemoryError("host memory short (test)")
    hostcopy.host_like = refused
from gpuguard.integrations.guard import TrainerGuard
install = TrainerGuard.install
def at(var, trainer, batch):
    return var in os.environ and tuple(map(int, os.environ[var].split(":"))) == (trainer.epoch + 1, batch)
def install_with_hooks(self, model):
    install(self, model)
    count = [0]
    def epoch_start(trainer):
        count[0] = 0
    def batch_start(trainer):
        count[0] += 1
        if at("SIGNAL_AT", trainer, count[0]) or at("STUCK_AT", trainer, count[0]):
            os.kill(os.getpid(), signal.SIGUSR1)
        while at("STUCK_AT", trainer, count[0]) or at("BLOCK_AT", trainer, count[0]):
            time.sleep(3600)
    def train_end(trainer):
        import torch
        torch.save({"model": trainer.model.state_dict(), "ema": trainer.ema.ema.state_dict(),
                    "optimizer": trainer.optimizer.state_dict()}, os.environ["FINAL_STATE"])
    model.add_callback("on_train_epoch_start", epoch_start)
    model.add_callback("on_train_batch_start", batch_start)
    if "FINAL_STATE" in os.environ:
        model.add_callback("on_train_end", train_end)
TrainerGuard.install = install_with_hooks
""" + TRAINED_LOG_HOOK + """from gpuguard.integrations.ultralytics import main
sys.exit(main())
"""
