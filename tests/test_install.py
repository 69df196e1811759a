"""deploy/install.sh and deploy/uninstall.sh (and `make install`/`make uninstall`), into a
temporary DESTDIR.

Offline, and in seconds: gpuguard's wheel is built once from a copy of this tree
(`python -m build --wheel --no-isolation`), and its base dependencies are installed with
`--no-index --find-links` from wheels repacked out of this venv's own installed copies.

Not covered here: resolving the dependencies from a real index and their wheels as published
(the repacked ones hold the same files), the `yolo` extra, `make dist` (an isolated build that
needs an index), the groupadd, groupdel, systemctl and journalctl calls on a real system (under
DESTDIR the scripts only print them; the test checks that they do), and the daemon started
by systemd from the installed unit.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import os
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytest.importorskip("build", reason="the dev extra's `build` (make venv) builds the wheel")

REPO = Path(__file__).resolve().parents[1]
VENV = "opt/gpuguard"
UNIT = "etc/systemd/system/gpuguard.service"
CONFIG = "etc/gpuguard/config.toml"
CATALOG = "usr/lib/systemd/catalog/gpuguard.catalog"
BASH = "usr/share/bash-completion/completions/gpuguardctl"
ZSH = "usr/share/zsh/vendor-completions/_gpuguardctl"
MAN1 = "usr/share/man/man1"
DOC = "usr/share/doc/gpuguard"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # the wheel is built once for the module: 40 s alone


def build_wheel(out: Path, drop: tuple[str, ...] = ()) -> Path:
    """gpuguard's wheel, built from a copy of the tree (less `drop`): the checkout's build/ is not touched."""
    src = out / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "gpuguard", src / "gpuguard", ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for path in drop:
        shutil.rmtree(src / path)
    # -x: setuptools builds wheels itself; build-system's "wheel" need not be installed
    cmd = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "-x", "--outdir", str(out), str(src)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=180)
    (wheel,) = out.glob("gpuguard-*.whl")
    return wheel


def repack(dist: importlib.metadata.Distribution, folder: Path) -> None:
    """A wheel of an installed distribution, from the files its RECORD lists (scripts aside:
    pip writes them again from entry_points.txt)."""
    tags = [line.split(":", 1)[1].strip() for line in dist.read_text("WHEEL").splitlines() if line.startswith("Tag:")]
    tag = tags[0]
    name = canonicalize_name(dist.metadata["Name"]).replace("-", "_")
    record, info = [], None
    path = folder / f"{name}-{dist.version}-{tag}.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as whl:
        for f in dist.files or []:
            rel = f.as_posix()
            top, _, base = rel.partition("/")
            if rel.startswith("..") or "__pycache__" in rel:
                continue
            if top.endswith(".dist-info"):
                info = top
                if base in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json"):
                    continue
            data = Path(f.locate()).read_bytes()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            whl.writestr(rel, data)
            record.append(f"{rel},sha256={digest},{len(data)}")
        assert info, dist
        record.append(f"{info}/RECORD,,")
        whl.writestr(f"{info}/RECORD", "\n".join(record) + "\n")


def runtime_requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as whl:
        meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        text = whl.read(meta).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory, wheel) -> Path:
    """The base dependencies of the wheel (no extras), each with its own, as wheels."""
    folder = tmp_path_factory.mktemp("wheelhouse")
    todo, seen = runtime_requirements(wheel), set()
    while todo:
        req = Requirement(todo.pop())
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        if canonicalize_name(req.name) in seen:
            continue
        seen.add(canonicalize_name(req.name))
        dist = importlib.metadata.distribution(req.name)
        repack(dist, folder)
        todo += dist.requires or []
    assert {"psutil", "structlog", "nvidia-ml-py"} <= seen
    assert not seen & {"torch", "ultralytics", "torchvision"}  # the yolo extra stays out
    return folder


def sh(*cmd: str | Path, root: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DESTDIR": str(root)}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    if check and done.returncode != 0:
        pytest.fail(f"{cmd} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


def install_args(wheel: Path, wheelhouse: Path) -> list[str]:
    return ["--no-index", "--find-links", str(wheelhouse), "--python", sys._base_executable, str(wheel)]


def files_outside_venv(root: Path) -> set[str]:
    """Every file and symlink under root, the venv aside, relative to root (empty folders left
    behind, /usr/share/doc say, are not counted)."""
    found = set()
    for dirpath, dirs, files in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if rel.as_posix() == VENV or rel.as_posix().startswith(VENV + "/"):
            continue
        found |= {(rel / n).as_posix() for n in files}
        found |= {(rel / n).as_posix() for n in dirs if Path(dirpath, n).is_symlink()}
    return found


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def shipped(wheel: Path, folder: str) -> list[str]:
    with zipfile.ZipFile(wheel) as whl:
        return sorted(n.rsplit("/", 1)[1] for n in whl.namelist() if n.startswith(f"gpuguard/{folder}/"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory, wheel, wheelhouse) -> tuple[Path, str]:
    """One install through `make install`, kept by the tests below in order; the last ones uninstall it."""
    root = tmp_path_factory.mktemp("root")
    args = " ".join(install_args(wheel, wheelhouse))
    done = sh("make", "--no-print-directory", "install", f"DESTDIR={root}", f"INSTALL_ARGS={args}", root=root)
    return root, done.stdout


def test_every_file_lands_where_it_should_with_its_mode(installed, wheel):
    root, out = installed
    mans = shipped(wheel, "ctl/man")
    completions = shipped(wheel, "ctl/completions")
    assert mans and completions == ["_gpuguardctl", "gpuguardctl"], "the wheel ships no man pages or completions"
    assert files_outside_venv(root) == {
        "usr/local/bin/gpuguardd",
        "usr/local/bin/gpuguardctl",
        UNIT,
        CONFIG,
        CATALOG,
        BASH,
        ZSH,
        f"{DOC}/DEPLOY.md",
        f"{DOC}/config.example.toml",
        *(f"{MAN1}/{m}" for m in mans),
    }
    same = {
        UNIT: REPO / "systemd/gpuguard.service",
        CONFIG: REPO / "config.example.toml",
        CATALOG: REPO / "systemd/gpuguard.catalog",
        f"{DOC}/DEPLOY.md": REPO / "docs/DEPLOY.md",
        f"{DOC}/config.example.toml": REPO / "config.example.toml",
        BASH: REPO / "gpuguard/ctl/completions/gpuguardctl",
        ZSH: REPO / "gpuguard/ctl/completions/_gpuguardctl",
        **{f"{MAN1}/{m}": REPO / "gpuguard/ctl/man" / m for m in mans},
    }
    owner = (0, 0) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
    for rel, src in same.items():
        path = root / rel
        assert path.read_bytes() == src.read_bytes(), rel
        assert mode(path) == 0o644, rel
        assert (path.stat().st_uid, path.stat().st_gid) == owner, rel
    for folder in ("etc/gpuguard", DOC, VENV, f"{VENV}/bin"):
        assert mode(root / folder) == 0o755, folder
    for cmd in ("gpuguardd", "gpuguardctl"):
        link = root / "usr/local/bin" / cmd
        assert link.is_symlink() and os.readlink(link) == f"/{VENV}/bin/{cmd}"
        assert mode(root / VENV / "bin" / cmd) == 0o755
    # the unit starts the daemon through that symlink, with the installed config
    (exec_start,) = [line for line in (root / UNIT).read_text().splitlines() if line.startswith("ExecStart=")]
    assert exec_start == "ExecStart=/usr/local/bin/gpuguardd --config /etc/gpuguard/config.toml"
    # nothing on the real system: each such call is only shown
    for call in ("groupadd --system gpuguard", "systemctl daemon-reload"):
        assert f"DESTDIR: would run: {call}" in out
    if shutil.which("journalctl"):
        assert "DESTDIR: would run: journalctl --update-catalog" in out


def test_installed_commands_run_from_the_venv(installed, wheel):
    root, out = installed
    bindir = root / VENV / "bin"
    version = re.search(r"gpuguard-([^-]+)-", wheel.name).group(1)
    ctl = subprocess.run([bindir / "gpuguardctl", "--version"], cwd="/", capture_output=True, text=True, timeout=60)
    assert (ctl.returncode, ctl.stdout.strip()) == (0, f"gpuguardctl {version}"), ctl.stderr
    assert f"installed gpuguardctl {version}" in out
    where = subprocess.run(
        [bindir / "python", "-c", "import gpuguard.daemon.main, gpuguard.ctl, gpuguard; print(gpuguard.__file__)"],
        cwd="/", capture_output=True, text=True, timeout=60, check=True,
    )
    assert where.stdout.startswith(str(root / VENV)), where.stdout  # not the checkout
    daemon = subprocess.run([bindir / "gpuguardd", "--help"], cwd="/", capture_output=True, text=True, timeout=60)
    assert daemon.returncode == 0 and "--simulate" in daemon.stdout, daemon.stderr
    check = subprocess.run([bindir / "python", "-m", "pip", "check"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout  # every base dependency is there
    listed = subprocess.run([bindir / "python", "-m", "pip", "list"], capture_output=True, text=True, timeout=60).stdout
    assert "torch" not in listed and "ultralytics" not in listed


def test_a_second_run_upgrades_and_keeps_the_config(installed, wheel, wheelhouse):
    root, _ = installed
    config = root / CONFIG
    config.write_text("[daemon]\nlog_level = \"debug\"\n")
    config.chmod(0o640)
    stale = next((root / VENV / "lib").glob("python3*/site-packages/gpuguard/__init__.py"))
    stale.write_text("broken = True\n")  # the same version again still replaces the package
    done = sh("bash", "deploy/install.sh", *install_args(wheel, wheelhouse), root=root)
    assert "kept as it is" in done.stdout and "upgrading in place" in done.stdout
    assert config.read_text() == "[daemon]\nlog_level = \"debug\"\n" and mode(config) == 0o640
    assert "__version__" in stale.read_text()


def test_uninstall_keeps_config_and_state(installed):
    root, _ = installed
    state = root / "var/lib/gpuguard/events.db"
    dropin = root / "etc/systemd/system/gpuguard.service.d/override.conf"
    others = [root / "usr/local/bin/other-tool", root / MAN1 / "other.1"]
    for path in (state, dropin, *others):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x\n")
    done = sh("make", "--no-print-directory", "uninstall", f"DESTDIR={root}", root=root)
    assert "DESTDIR: would run: systemctl disable --now gpuguard.service" in done.stdout
    assert "DESTDIR: would run: groupdel" not in done.stdout
    assert not (root / VENV).exists() and not (root / DOC).exists()
    assert files_outside_venv(root) == {
        CONFIG,
        "var/lib/gpuguard/events.db",
        "etc/systemd/system/gpuguard.service.d/override.conf",
        "usr/local/bin/other-tool",
        f"{MAN1}/other.1",
    }


def test_purge_removes_config_state_and_group(installed):
    root, _ = installed
    done = sh("bash", "deploy/uninstall.sh", "--purge", root=root)
    assert "DESTDIR: would run: groupdel gpuguard" in done.stdout
    for folder in ("etc/gpuguard", "var/lib/gpuguard", "etc/systemd/system/gpuguard.service.d"):
        assert not (root / folder).exists(), folder
    assert files_outside_venv(root) == {
        "usr/local/bin/other-tool",
        f"{MAN1}/other.1",
    }


def test_existing_config_kept_and_missing_completions_skipped(tmp_path, wheelhouse):
    """A wheel without completions and man pages (built before `python -m gpuguard.ctl.generate`
    ran), onto a box that already has a config and someone else's gpuguardctl symlink."""
    wheel = build_wheel(tmp_path / "wheel", drop=("gpuguard/ctl/completions", "gpuguard/ctl/man"))
    root = tmp_path / "root"
    config = root / CONFIG
    config.parent.mkdir(parents=True)
    config.write_text("# mine\n")
    config.chmod(0o600)
    config.parent.chmod(0o750)
    done = sh("bash", "deploy/install.sh", *install_args(wheel, wheelhouse), root=root)
    assert "ctl/completions/gpuguardctl is not in the installed package: skipped" in done.stdout
    assert "ctl/completions/_gpuguardctl is not in the installed package: skipped" in done.stdout
    assert "no man pages in the installed package: skipped" in done.stdout
    assert config.read_text() == "# mine\n" and mode(config) == 0o600 and mode(config.parent) == 0o750
    assert not (root / BASH).exists() and not (root / ZSH).exists() and not (root / MAN1).exists()
    assert (root / UNIT).exists() and (root / CATALOG).exists()

    foreign = root / "usr/local/bin/gpuguardctl"
    foreign.unlink()
    foreign.symlink_to("/usr/bin/true")
    done = sh("bash", "deploy/uninstall.sh", "--purge", root=root)
    assert f"kept {foreign}: not the installer's symlink" in done.stdout
    assert files_outside_venv(root) == {
        "usr/local/bin/gpuguardctl",
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/nonexistent/gpuguard-9.9-py3-none-any.whl"], "no such file"),
        (["README.md"], "not a gpuguard wheel"),
        (["--frobnicate"], "unknown option --frobnicate"),
    ],
)
def test_install_refuses_bad_arguments(tmp_path, args, message):
    done = sh("bash", "deploy/install.sh", *args, root=tmp_path, check=False)
    assert done.returncode == 1 and message in done.stderr
    assert not any(tmp_path.iterdir())


def test_install_refuses_to_replace_a_real_command(tmp_path, wheel):
    other = tmp_path / "usr/local/bin/gpuguardd"
    other.parent.mkdir(parents=True)
    other.write_text("#!/bin/sh\n")
    done = sh("bash", "deploy/install.sh", wheel, root=tmp_path, check=False)
    assert done.returncode == 1 and "exists and is not a symlink" in done.stderr
    assert not (tmp_path / VENV).exists()
