"""The loopback cluster (lab.cluster: Slurm n1 and n2, SeaweedFS, a gpuguardd per node),
brought up afresh for each test module (a hand-off leaves a node drained) and torn down after it."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.cluster import Cluster
from lab.slurm import missing_binaries


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Its directory (every daemon's log and state) is kept when a test of the module failed."""
    if os.geteuid() != 0:
        pytest.skip("the loopback cluster needs root (munged as munge, slurmd as root)")
    if missing := missing_binaries():
        pytest.skip(f"Slurm/munge not installed ({', '.join(missing)}): make test-cluster installs them")
    workdir = Path(tempfile.mkdtemp(prefix="gpuguard-cluster-"))  # not tmp_path: user munge must reach its files
    failed = request.session.testsfailed
    try:
        with Cluster(workdir) as running:
            yield running
    finally:
        if request.session.testsfailed > failed:
            warnings.warn(f"the loopback cluster's logs and state are kept in {workdir}", stacklevel=1)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
