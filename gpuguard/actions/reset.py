"""A GPU reset through the configured command (nvidia-smi by default).

A reset needs root and no process holding the GPU, gpuguard's own NVML
handles included: the daemon closes NVML around the command and reopens it
after. The argv is built from a template, never through a shell.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from gpuguard.nvml.types import GpuInfo


@dataclass(frozen=True, slots=True)
class ResetResult:
    ok: bool
    detail: str
    argv: tuple[str, ...] = ()


def reset_argv(template: Sequence[str], gpu: GpuInfo) -> list[str]:
    """Fill {uuid}, {index} and {pci_bus_id} in each argument of the template."""
    values = {"uuid": gpu.uuid, "index": str(gpu.index), "pci_bus_id": gpu.pci_bus_id}
    return [arg.format_map(values) for arg in template]


def run_reset_command(argv: Sequence[str], timeout_s: float) -> ResetResult:
    """Run the reset command; its exit status decides, its output explains."""
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL, check=False
        )
    except FileNotFoundError:
        return ResetResult(False, f"reset command not found: {argv[0]}", tuple(argv))
    except subprocess.TimeoutExpired:
        return ResetResult(False, f"reset command did not finish within {timeout_s:g}s", tuple(argv))
    except OSError as exc:
        return ResetResult(False, f"reset command failed to start: {exc}", tuple(argv))
    output = (proc.stdout + proc.stderr).strip().splitlines()
    tail = " | ".join(output[-3:])[:400]
    if proc.returncode == 0:
        return ResetResult(True, tail or "reset command succeeded", tuple(argv))
    return ResetResult(False, f"reset command exited {proc.returncode}: {tail}", tuple(argv))
