"""Fixtures for the YOLO trainer tests: a tiny dataset and a clean job environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gpuguard.integrations.dataset import make_dataset


@pytest.fixture(scope="session")
def data_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 train images (4 batches of 8: room to land a signal mid-epoch), 4 val."""
    return make_dataset(tmp_path_factory.mktemp("dataset"), train=32, val=4, imgsz=64)


@pytest.fixture(scope="session")
def base_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The test runner's environment without gpuguard/pytest variables, CPU only, offline config dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUGUARD_", "PYTEST_", "YOLO_"))}
    cache = tmp_path_factory.mktemp("cache")
    env |= {
        "CUDA_VISIBLE_DEVICES": "",  # never touch a real GPU
        "XDG_CACHE_HOME": str(cache),
        "YOLO_CONFIG_DIR": str(cache / "yolo-config"),
        "PYTHONUNBUFFERED": "1",
    }
    return env
