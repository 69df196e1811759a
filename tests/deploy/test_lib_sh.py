"""deploy/lib.sh, the preamble deploy/install.sh and deploy/uninstall.sh share: each script
sources it and defines none of it again, it travels in the sdist `make dist` builds (MANIFEST.in)
beside them, and the scripts work from an unpacked sdist. The installs themselves are
tests/test_install.py's."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from harness import REPO

DEPLOY = REPO / "deploy"
SCRIPTS = ("install.sh", "uninstall.sh")


def functions(text: str) -> set[str]:
    return set(re.findall(r"^\s*([a-z_]+)\(\)\s*\{", text, re.M))


def test_the_scripts_source_lib_sh_and_repeat_none_of_it() -> None:
    lib = (DEPLOY / "lib.sh").read_text()
    shared = functions(lib)
    assert {"say", "note", "die", "host", "usage", "need_root"} <= shared
    for name in SCRIPTS:
        text = (DEPLOY / name).read_text()
        head, _, body = text.partition("\nset -euo pipefail\n")
        assert body, f"{name}: set -euo pipefail before sourcing lib.sh"
        assert re.search(r'^\. ".*/lib\.sh"', body, re.M), f"{name} does not source lib.sh"
        assert not shared & functions(text), f"{name} defines again: {shared & functions(text)}"
        for assignment in ("D=${DESTDIR", "VENV=/opt/gpuguard", "GROUP=gpuguard"):
            assert assignment not in text, f"{name} sets {assignment} itself"
    assert not os.access(DEPLOY / "lib.sh", os.X_OK), "lib.sh is sourced, never run"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (Debian package shellcheck)")
def test_shellcheck_follows_the_source() -> None:
    done = subprocess.run(
        ["shellcheck", "-x", *(f"deploy/{n}" for n in (*SCRIPTS, "lib.sh"))],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout


@pytest.mark.parametrize("name", SCRIPTS)
def test_errors_still_name_their_script(tmp_path: Path, name: str) -> None:
    done = subprocess.run(
        ["bash", str(DEPLOY / name), "--frobnicate"], env={**os.environ, "DESTDIR": str(tmp_path)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith(f"{name}: unknown "), done.stderr


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist of `make dist`, built offline (no isolation) from a copy of the tree it reads."""
    pytest.importorskip("build", reason="the dev extra's `build` (make venv) builds the sdist")
    src = tmp_path_factory.mktemp("src")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for folder in ("gpuguard", "deploy", "systemd", "docs"):
        shutil.copytree(REPO / folder, src / folder, ignore=skip)
    for name in ("pyproject.toml", "README.md", "MANIFEST.in", "config.example.toml"):
        shutil.copy2(REPO / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "build", "--sdist", "--no-isolation", "-x", "--outdir", str(out), str(src)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (tarball,) = out.glob("gpuguard-*.tar.gz")
    return tarball


def test_the_sdist_carries_the_deploy_scripts_and_lib_sh(sdist: Path, tmp_path: Path) -> None:
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}
        for name in (*SCRIPTS, "lib.sh"):
            assert f"deploy/{name}" in members, f"the sdist lacks deploy/{name}"
        for name in SCRIPTS:
            assert members[f"deploy/{name}"].mode & 0o111, f"deploy/{name} lost its exec bits"
        tar.extractall(tmp_path, filter="data")
    (tree,) = tmp_path.glob("gpuguard-*")
    for name in SCRIPTS:
        done = subprocess.run([str(tree / "deploy" / name), "--help"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout.startswith(("Install gpuguard", "Remove what")), done.stderr
    # an uninstall of nothing, under DESTDIR, from the unpacked sdist: lib.sh's functions at work
    root = tmp_path / "root"
    root.mkdir()
    done = subprocess.run(
        ["bash", str(tree / "deploy" / "uninstall.sh")], env={**os.environ, "DESTDIR": str(root)},
        cwd="/", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "==> files" in done.stdout and "DESTDIR: would run: systemctl daemon-reload" in done.stdout
