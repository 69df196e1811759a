"""A tiny PyTorch DDP training for the DDP tests: gloo on the CPU, one linear layer, random data.

Run as a gpuguard job under torchrun, which must forward the checkpoint signal:

    python -m torch.distributed.run --standalone --nproc_per_node 2
        --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 ddp_job.py  (one line)

Every rank catches GPUGUARD_CHECKPOINT_SIGNAL and only sets a flag. Each step
rank 0 saves at once if it was asked (before any collective, which a dead peer
would block), then the ranks all-reduce the flag, so they all stop at the same
step even though the signal reaches them at slightly different times; rank 0
saves then if only a peer had been asked. Only rank 0 ever saves (torch.save
to a temp file + os.replace); a barrier holds the other ranks until the file is
in place, and every rank exits 75 (torchrun itself then exits 1). Rank 0 also
saves every K steps and touches GPUGUARD_HEARTBEAT; a resume
(GPUGUARD_RESUME_FROM) loads on every rank. For the tests each rank appends a
line to `ranks.jsonl` at start and rank 0 one to `saves.jsonl` per save (a
non-zero rank never writes there).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

EX_TEMPFAIL = 75
RANKS = "ranks.jsonl"
SAVES = "saves.jsonl"


def append_line(path: Path, record: dict[str, object]) -> None:
    """One JSON line; O_APPEND keeps lines of concurrent ranks whole."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def save_atomic(path: Path, state: dict[str, object]) -> None:
    """torch.save is not atomic: write a temp file next to it, then rename over."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default="ck.pt", help="rank 0's checkpoint, relative to the cwd")
    p.add_argument("--every", type=int, default=5, help="save a checkpoint every K steps")
    p.add_argument("--step-s", type=float, default=0.05, help="sleep per step, so a test can land a signal")
    p.add_argument("--steps", type=int, default=100_000, help="exit 0 after this many steps in total")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    requested = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal requested
        requested = True

    # before anything slow: from now on the signal cannot kill this rank
    signal.signal(signal.Signals[os.environ.get("GPUGUARD_CHECKPOINT_SIGNAL", "SIGUSR1")], on_signal)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)
    model = nn.Linear(4, 1)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    ckpt = Path(args.checkpoint).absolute()
    step = 0
    resume = os.environ.get("GPUGUARD_RESUME_FROM")
    if resume:
        state = torch.load(resume, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
    append_line(
        Path(RANKS),
        {
            "rank": rank,
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "sid": os.getsid(0),
            "start_step": step,
            "attempt": os.environ.get("GPUGUARD_ATTEMPT"),
            "resume": resume,
        },
    )
    heartbeat = os.environ.get("GPUGUARD_HEARTBEAT")

    def save() -> None:
        save_atomic(ckpt, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "rank": rank})
        append_line(Path(SAVES), {"rank": rank, "pid": os.getpid(), "step": step})

    while step < args.steps:
        asked = requested  # read once: the handler may set it at any moment
        if asked and rank == 0:
            save()  # before the collective: a peer that died with its GPU cannot block this save
        flag = torch.tensor([int(asked)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # everyone stops at the same step
        if flag.item():
            if rank == 0 and not asked:
                save()
            dist.barrier()  # no rank leaves (and fails the group) before the file is in place
            print(f"rank {rank}: checkpoint at step {step}, exit {EX_TEMPFAIL}", flush=True)
            return EX_TEMPFAIL
        x = torch.randn(8, 4)
        loss = (ddp(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        time.sleep(args.step_s)
        if rank == 0:
            if heartbeat:
                Path(heartbeat).touch()
            if step % args.every == 0:
                save()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
