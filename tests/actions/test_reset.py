"""The GPU reset command: argv from the template, outcome from the exit status."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from gpuguard.actions.reset import reset_argv, run_reset_command
from gpuguard.config import ResetConfig
from gpuguard.nvml.types import GpuInfo

GPU = GpuInfo(3, "GPU-12345678-abcd-ef01-2345-6789abcdef01", "00000000:5D:00.0", "H100", None, None)


def script(tmp_path: Path, body: str) -> list[str]:
    """argv that runs `body` as a Python script (no shell involved)."""
    path = tmp_path / "fake_reset.py"
    path.write_text(body)
    return [sys.executable, str(path)]


def test_reset_argv_fills_every_placeholder() -> None:
    template = ["tool", "--uuid={uuid}", "-i", "{index}", "{pci_bus_id}", "plain"]
    assert reset_argv(template, GPU) == [
        "tool",
        f"--uuid={GPU.uuid}",
        "-i",
        "3",
        "00000000:5D:00.0",
        "plain",
    ]


def test_default_template_is_nvidia_smi_by_uuid() -> None:
    assert reset_argv(ResetConfig().command, GPU) == ["nvidia-smi", "--gpu-reset", "-i", GPU.uuid]


def test_placeholder_values_are_not_reinterpreted() -> None:
    odd = GpuInfo(0, "GPU-{index};$(rm -rf /)", "0000:01:00.0", "x", None, None)
    assert reset_argv(["{uuid}"], odd) == ["GPU-{index};$(rm -rf /)"]


def test_success_runs_the_filled_argv(tmp_path: Path) -> None:
    record = tmp_path / "argv.json"
    body = f"import json, sys\nopen({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\nprint('GPU reset ok')\n"
    argv = script(tmp_path, body)
    filled = reset_argv([*argv, "{uuid}", "{index}", "{pci_bus_id}"], GPU)
    result = run_reset_command(filled, timeout_s=30)
    assert result.ok
    assert result.detail == "GPU reset ok"
    assert result.argv == tuple(filled)
    assert json.loads(record.read_text()) == [GPU.uuid, "3", GPU.pci_bus_id]


def test_success_without_output_says_so(tmp_path: Path) -> None:
    result = run_reset_command(script(tmp_path, "pass\n"), timeout_s=30)
    assert result.ok and result.detail == "reset command succeeded"


def test_failure_reports_exit_code_and_output_tail(tmp_path: Path) -> None:
    body = (
        "import sys\n"
        "for i in range(10):\n    print(f'line {i}')\n"
        "print('Unable to reset GPU: in use by another client', file=sys.stderr)\n"
        "sys.exit(3)\n"
    )
    result = run_reset_command(script(tmp_path, body), timeout_s=30)
    assert not result.ok
    assert result.detail.startswith("reset command exited 3: ")
    assert "in use by another client" in result.detail
    assert "line 9" in result.detail and "line 0" not in result.detail  # only the tail
    assert len(result.detail) < 450


def test_missing_binary(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-nvidia-smi")
    result = run_reset_command([missing, "--gpu-reset"], timeout_s=30)
    assert not result.ok
    assert result.detail == f"reset command not found: {missing}"


def test_not_executable(tmp_path: Path) -> None:
    path = tmp_path / "reset"
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o644)
    result = run_reset_command([str(path)], timeout_s=30)
    assert not result.ok and result.detail.startswith("reset command failed to start: ")


def test_timeout_kills_and_reports(tmp_path: Path) -> None:
    start = time.monotonic()
    result = run_reset_command(script(tmp_path, "import time\ntime.sleep(30)\n"), timeout_s=0.5)
    assert time.monotonic() - start < 10
    assert not result.ok
    assert result.detail.startswith("reset command did not finish within ")
