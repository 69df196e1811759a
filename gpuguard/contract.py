"""The names and numbers of the outside interface (../shared/CONTRACT.md),
defined once: the daemon, the control socket, the job environment and the
in-job helpers all read them from here (stdlib only, so a trainer can import
it without pulling in the daemon)."""

from __future__ import annotations

import re

# "I saved a checkpoint, restart me": never counted as a crash
EX_TEMPFAIL = 75

# a job's name: letters, digits, '_', '.', '-', at most 64, not starting with
# a punctuation mark; matched whole (fullmatch), so no trailing newline slips in
JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

# what a managed job finds in its environment
ENV_PREFIX = "GPUGUARD_"
ENV_JOB = "GPUGUARD_JOB"
ENV_ATTEMPT = "GPUGUARD_ATTEMPT"
ENV_CHECKPOINT_SIGNAL = "GPUGUARD_CHECKPOINT_SIGNAL"
ENV_HEARTBEAT = "GPUGUARD_HEARTBEAT"
ENV_CHECKPOINT_FILE = "GPUGUARD_CHECKPOINT_FILE"
ENV_RESUME_FROM = "GPUGUARD_RESUME_FROM"
ENV_SOCKET = "GPUGUARD_SOCKET"  # gpuguardctl's socket, never handed to a job
CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
# a warm standby (docs/STANDBY.md): the next attempt, started early without GPUs,
# waits until gpuguard writes the hand-over file named here, then trains
ENV_STANDBY = "GPUGUARD_STANDBY"  # "1" while it waits
ENV_STANDBY_FILE = "GPUGUARD_STANDBY_FILE"
# why gpuguard asks for a checkpoint: a JSON note it writes before the checkpoint
# signal (gpuguard/fault.py), so a trainer on a GPU that is gone does not wait for itself
ENV_FAULT_FILE = "GPUGUARD_FAULT_FILE"
# torchrun's agent forwards these signals to its workers (docs/DDP.md)
ENV_TORCHRUN_SIGNALS = "PET_SIGNALS_TO_HANDLE"

# systemd's variables (sd_notify(3), sd_listen_fds(3)): they belong to the
# daemon's (or the caller's) service manager, never to a job
SYSTEMD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")

# placeholders a `[reset] command` and the node hooks may use
RESET_PLACEHOLDERS = ("uuid", "index", "pci_bus_id")
HOOK_PLACEHOLDERS = ("hostname", "reason", "gpus", "uuids", "state")
# placeholders the [slurm] drain and requeue commands may use
SLURM_PLACEHOLDERS = ("node", "job_id", "reason")
# One Slurm node name, never a host list ("n[1-9]", "n1,n2"): `scontrol update nodename=`
# would take those as many nodes
SLURM_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def valid_job_name(name: object) -> bool:
    """True for a name the contract allows (the whole string, no newline)."""
    return isinstance(name, str) and JOB_NAME.fullmatch(name) is not None


def for_job(name: str) -> bool:
    """May a variable of this name be handed on to a job? Not systemd's, not ours."""
    return name not in SYSTEMD_ENV and not name.startswith(("WATCHDOG_", ENV_PREFIX))
