"""The longer texts of gpuguardctl's --help (and so of its man page): the
faults `inject` knows, what `run` gives a job, what `check` exits with."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from gpuguard import contract
from gpuguard.ctl.wire import RUN_ENV_HELP

WIDTH = 79
MAX_TERM_COLUMN = 30  # where a listed item's text starts, at the most

# every fault of gpuguard/sim/faults.py (its USAGE), with what it does
INJECT_FAULTS: tuple[tuple[str, str], ...] = (
    ("xid CODE", "the driver logs Xid CODE (1-999) in the kernel log; 79 also takes the GPU off the bus, "
                 "48 adds an uncorrected ECC error"),
    ("ecc-dbe", "a double-bit (uncorrected) ECC error, with its Xid 48"),
    ("ecc-sbe COUNT", "COUNT single-bit (corrected) ECC errors"),
    ("hang", "the GPU hangs: its utilisation stays at 0"),
    ("lost", "the GPU is lost: every NVML call on it fails"),
    ("remap-pending", "a row remap is pending (the GPU needs a reset)"),
    ("thermal CELSIUS", "hold the temperature at CELSIUS (0-150; 90 and over also slows the clocks)"),
    ("nvml-hang [SECONDS]", "NVML calls on this GPU block for SECONDS (default 30, at most 3600)"),
    ("clear", "clear every injected fault"),
    ("attach PID", "list process PID on the GPU while it runs, as if it used the GPU (a process gpuguard did not start)"),
    ("detach PID", "stop listing process PID on the GPU"),
)  # fmt: skip

JOB_VARIABLES: tuple[tuple[str, str], ...] = (
    (contract.CUDA_VISIBLE_DEVICES, "the UUIDs of its GPUs, comma-separated"),
    (contract.ENV_JOB, "the job's name"),
    (contract.ENV_ATTEMPT, "1 for the first start, then 2, 3, ..."),
    (contract.ENV_RESUME_FROM, "the absolute path of the newest checkpoint that passed validation; unset when there is none"),
    (contract.ENV_CHECKPOINT_SIGNAL, "the signal that asks for a checkpoint now (default SIGUSR1)"),
    (contract.ENV_HEARTBEAT, "a file the job may touch to show progress"),
    (contract.ENV_CHECKPOINT_FILE, "a file where the job may write the path of its newest checkpoint, "
                                   "when it is not the --checkpoint one"),
    (contract.ENV_FAULT_FILE, "a JSON note gpuguard writes before the checkpoint signal: why, the GPU, and whether "
                              "that GPU is gone (then the job cannot finish its batch: save what you have now); "
                              "gpuguard.fault.read() reads it"),
    (contract.ENV_TORCHRUN_SIGNALS, "set for torchrun, so that it passes the checkpoint signal on to its workers"),
    (contract.ENV_STANDBY, "1 in a warm standby (run --standby) until it is handed its GPUs; "
                           "CUDA_VISIBLE_DEVICES is empty and GPUGUARD_ATTEMPT unset until then"),
    (contract.ENV_STANDBY_FILE, "in a warm standby: the hand-over file gpuguard.job.wait_until_started() waits for"),
)  # fmt: skip

RUN_NAME_HELP = (
    "the job's name: letters, digits, '_', '.', '-', at most 64, starting with a letter or digit; "
    "stop, logs, snapshots and rollback take it"
)
RUN_RESTARTS_HELP = (
    "give up (job failed) after N crash restarts, N restarts it asked for (exit 75 unasked) or N moves "
    "after GPU faults or hangs, each counted apart (default: the config's [jobs] max_restarts, 10)"
)
RUN_STANDBY_HELP = (
    "keep a warm standby: the next attempt starts early without GPUs (GPUGUARD_STANDBY=1) and waits in "
    "gpuguard.job.wait_until_started() until a fault hands it the GPUs; the command must call it"
)
RUN_HANDSHAKE = (
    "The checkpoint handshake: when a fault affects the job, gpuguard sends GPUGUARD_CHECKPOINT_SIGNAL to "
    "its main process and waits up to [jobs] checkpoint_grace_s for it to exit. Exit 75 (EX_TEMPFAIL) means "
    "\"I saved a checkpoint, restart me\" and never counts as a crash; the job is started again on healthy "
    "GPUs with GPUGUARD_RESUME_FROM. A job that does not handle the signal gets SIGTERM at once. Then the whole "
    "process tree gets SIGTERM, and SIGKILL after [jobs] stop_timeout_s. Exit 75 nobody asked for is a "
    "restart request: back-off, and it counts toward --max-restarts."
)
CHECK_HELP = "one line on stdout for node-problem-detector or Slurm's HealthCheckProgram"
CHECK_EXIT_HELP = (
    "Exit status: 0 every GPU is healthy (or degraded); 1 a GPU is unhealthy: faulted, excluded, resetting or "
    "unknown (an unknown GPU gives 1); 2 the state is unknown: the daemon is unreachable, its socket or config "
    "is wrong, or it sees no GPU."
)

Block = str | tuple[str, Sequence[tuple[str, str]]]  # a paragraph, or a titled listing of terms


def _epilog_block(block: Block) -> str:
    """One block as --help shows it: a filled paragraph, or terms and their texts in two columns."""
    if isinstance(block, str):
        return textwrap.fill(block, WIDTH)
    title, items = block
    column = min(max(len(term) for term, _ in items) + 4, MAX_TERM_COLUMN)
    lines = [title]
    for term, text in items:
        first = f"  {term}".ljust(column)
        lines.append(textwrap.fill(text, WIDTH, initial_indent=first, subsequent_indent=" " * column))
    return "\n".join(lines)


def epilog(blocks: Sequence[Block]) -> str:
    """The blocks filled to WIDTH columns, a blank line apart (for
    RawDescriptionHelpFormatter, which keeps the lines)."""
    return "\n\n".join(map(_epilog_block, blocks))


# what follows the options in a command's --help (and its man page section)
NOTES: dict[str, tuple[Block, ...]] = {
    "run": (
        "The job's command follows --, e.g.: gpuguardctl run --name train --gpus 2 -- python train.py",
        RUN_HANDSHAKE,
        ("What the job gets in its environment:", JOB_VARIABLES),
        RUN_ENV_HELP,
    ),
    "inject": (
        ("Faults (FAULT [VALUE]):", INJECT_FAULTS),
        "Simulated GPUs only (gpuguardd --simulate N); on NVML, inject is refused (exit 1). A fault stays until "
        "`gpuguardctl inject GPU clear` or, for most, a reset. An injected Xid enters through the kernel log, "
        "as a real one does.",
    ),
    "check": (CHECK_EXIT_HELP,),
    "completion": ("e.g. in ~/.bashrc: source <(gpuguardctl completion bash)",),
}
