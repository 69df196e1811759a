"""`gpuguardctl check` with many unhealthy GPUs: schedulers keep only the start of the
line (NPD 512 bytes, a Slurm drain reason about 200), so which GPUs comes first."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import running_daemon, wait_until

pytestmark = pytest.mark.e2e


def test_many_unhealthy_gpus_are_counted_and_named_first(tmp_path: Path) -> None:
    with running_daemon(tmp_path, gpus=8) as d:
        for index in (1, 3, 4, 6):
            d.ctl("exclude", str(index), "--reason", "a long operator reason " * 8)
        line = wait_until(
            lambda: (r := d.ctl("check", check=False)).returncode == 1 and "4 of" in r.stdout and r.stdout, 10, "check to see 4 excluded"
        )
        assert line.startswith("gpuguard: 4 of 8 GPUs unhealthy (1, 3, 4, 6); GPU 1 (")
        assert len(line) > 512  # the whole story is still there for a reader with room


def test_one_unhealthy_gpu_reads_as_before(tmp_path: Path) -> None:
    with running_daemon(tmp_path, gpus=2) as d:
        d.ctl("exclude", "1", "--reason", "bad fan")
        line = wait_until(lambda: (r := d.ctl("check", check=False)).returncode == 1 and r.stdout, 10, "check to see GPU 1")
        assert line.startswith("gpuguard: GPU 1 (") and "of 2" not in line
