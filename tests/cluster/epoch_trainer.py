"""A trainer for the cluster tests, run as a gpuguard job inside a Slurm batch job.

Trains `--epochs` epochs of `--steps` steps. After each epoch it saves a checkpoint
shaped like torch.save's (atomically) and appends "EPOCH NODE ATTEMPT" to the shared
`--record` file, so the test can see that every epoch completed exactly once and
where. It resumes after the last epoch of GPUGUARD_RESUME_FROM; on the checkpoint
signal it saves the last whole epoch and exits 75 (the contract's "restart me").
"""

from __future__ import annotations

import argparse
import os
import pickle
import signal
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: checkpoint_files
from checkpoint_files import checkpoint_bytes  # noqa: E402

EX_TEMPFAIL = 75


def completed_epochs(path: Path) -> int:
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        return int(pickle.loads(archive.read(name))["epoch"])


def save(path: Path, epoch: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(checkpoint_bytes(os.urandom(4096), epoch=epoch))  # each save a new snapshot, even of the same epoch
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--step-s", type=float, default=0.05)
    p.add_argument("--record", type=Path, required=True)
    p.add_argument("--checkpoint", type=Path, default=Path("ckpt/last.pt"))
    args = p.parse_args(argv)
    resume = os.environ.get("GPUGUARD_RESUME_FROM")
    done = completed_epochs(Path(resume)) if resume else 0
    print(f"trainer: attempt {os.environ.get('GPUGUARD_ATTEMPT')} on {os.environ.get('SLURMD_NODENAME')}, "
          f"resuming from {resume or 'scratch'} after epoch {done}", flush=True)  # fmt: skip
    asked = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal asked
        asked = True

    signal.signal(signal.Signals[os.environ.get("GPUGUARD_CHECKPOINT_SIGNAL", "SIGUSR1")], on_signal)
    heartbeat = os.environ.get("GPUGUARD_HEARTBEAT")
    for epoch in range(done + 1, args.epochs + 1):
        for _ in range(args.steps):
            if asked:
                save(args.checkpoint, done)
                print(f"trainer: checkpoint asked for; saved after epoch {done}, exiting 75", flush=True)
                return EX_TEMPFAIL
            time.sleep(args.step_s)
            if heartbeat:
                Path(heartbeat).touch()
        save(args.checkpoint, epoch)
        with args.record.open("a") as f:
            f.write(f"{epoch} {os.environ.get('SLURMD_NODENAME')} {os.environ.get('GPUGUARD_ATTEMPT')}\n")
        done = epoch
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
