"""A scripted stand-in for a trainer, for the supervisor's end-to-end tests.

It speaks the contract's side of a managed job: records what it was given
(one JSON line per attempt in `attempts.jsonl` in its cwd), touches
GPUGUARD_HEARTBEAT every step, saves a torch-like zip checkpoint
(`archive/data.pkl` holding the step) atomically every K steps, resumes from
GPUGUARD_RESUME_FROM, and on GPUGUARD_CHECKPOINT_SIGNAL saves and exits 75.
Flags switch on the misbehaviours the tests need. Stdlib only: it also runs
under a system python3.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

EX_TEMPFAIL = 75
ATTEMPTS = "attempts.jsonl"
GRANDCHILD = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(600)\n"


def checkpoint_bytes(step: int) -> bytes:
    """A zip shaped like torch.save's output: `archive/data.pkl` plus a tensor blob."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"step": step}, protocol=2))
        archive.writestr("archive/data/0", os.urandom(4096))
    return buf.getvalue()


def read_step(path: Path) -> int:
    """The step a checkpoint of ours holds (raises on a torn file)."""
    with zipfile.ZipFile(path) as archive:
        return int(pickle.loads(archive.read("archive/data.pkl"))["step"])


def save_atomic(path: Path, step: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(checkpoint_bytes(step))
    os.replace(tmp, path)


def save_truncated(path: Path, step: int) -> None:
    """What a kill in the middle of a plain `write_bytes` leaves behind."""
    data = checkpoint_bytes(step)
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default="ck.pt", help="checkpoint file, relative to the cwd")
    p.add_argument("--every", type=int, default=5, help="save a checkpoint every K steps")
    p.add_argument("--step-s", type=float, default=0.05)
    p.add_argument("--finish-after", type=int, default=None, help="exit 0 after N steps in total")
    p.add_argument("--ignore-signal", action="store_true", help="ignore the checkpoint signal and SIGTERM")
    p.add_argument("--crash", action="store_true", help="exit 1 at once")
    p.add_argument("--child-session", action="store_true", help="start a SIGTERM-proof grandchild in a new session")
    p.add_argument("--save-on-term", action="store_true", help="on SIGTERM, save a checkpoint and exit 143")
    p.add_argument("--truncate-on-signal", action="store_true", help="on the signal, leave a half-written checkpoint")
    p.add_argument("--no-handler", action="store_true", help="install no handler for the checkpoint signal (its default action ends us)")
    p.add_argument("--tempfail-every", type=int, default=None, help="unasked, save and exit 75 at every K-th step (a restart request)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    ckpt = Path(args.checkpoint).absolute()
    resume = os.environ.get("GPUGUARD_RESUME_FROM")
    step = read_step(Path(resume)) if resume else 0
    grandchild = None
    if args.child_session:
        grandchild = subprocess.Popen([sys.executable, "-c", GRANDCHILD], start_new_session=True).pid
    record = {
        "pid": os.getpid(),
        "uid": os.getuid(),
        "start_step": step,
        "grandchild": grandchild,
        "env": {k: v for k, v in os.environ.items() if k == "CUDA_VISIBLE_DEVICES" or k.startswith("GPUGUARD_")},
    }
    with open(ATTEMPTS, "a") as f:
        f.write(json.dumps(record) + "\n")
    if args.crash:
        print(f"trainer: simulated crash at step {step}", file=sys.stderr, flush=True)
        return 1
    asked = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal asked
        asked = True

    sig = signal.Signals[os.environ.get("GPUGUARD_CHECKPOINT_SIGNAL", "SIGUSR1")]
    if args.ignore_signal:
        signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    elif not args.no_handler:
        signal.signal(sig, on_signal)
    if args.save_on_term:

        def on_term(_signum: int, _frame: object) -> None:
            save_atomic(ckpt, step)
            sys.exit(128 + signal.SIGTERM)

        signal.signal(signal.SIGTERM, on_term)
    heartbeat = os.environ.get("GPUGUARD_HEARTBEAT")
    while True:
        if asked:
            (save_truncated if args.truncate_on_signal else save_atomic)(ckpt, step)
            return EX_TEMPFAIL
        time.sleep(args.step_s)
        step += 1
        if heartbeat:
            Path(heartbeat).touch()
        if step % args.every == 0:
            save_atomic(ckpt, step)
        if args.finish_after is not None and step >= args.finish_after:
            return 0
        if args.tempfail_every and step % args.tempfail_every == 0:
            if step % args.every:
                save_atomic(ckpt, step)
            return EX_TEMPFAIL


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
