"""The import graph keeps the layers: data flows one way (sources -> health ->
policy -> actions), a lower layer never imports a higher one, no module
cycle, and the daemon stays light (no torch or ultralytics outside
gpuguard/integrations/, which run in the job's process)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import gpuguard

ROOT = Path(gpuguard.__file__).parent

# lowest first; a module's layer is that of its longest matching prefix
LAYERS: dict[str, int] = {
    # shared vocabulary: no behaviour
    "gpuguard": 0,
    "gpuguard.contract": 0,
    "gpuguard.observations": 0,
    "gpuguard.events": 0,
    "gpuguard.health.types": 0,
    "gpuguard.nvml.types": 0,
    "gpuguard.sdnotify": 0,
    "gpuguard.logs": 0,
    "gpuguard.durable": 0,
    "gpuguard.config": 1,
    # the storage url's parser: pure, so the config's checks use it
    "gpuguard.storage.url": 1,
    # sources
    "gpuguard.nvml": 2,
    "gpuguard.sim": 2,
    "gpuguard.kmsg": 2,
    # health
    "gpuguard.health": 3,
    # policy and actions
    "gpuguard.store": 4,
    "gpuguard.actions": 4,
    "gpuguard.supervisor": 4,
    "gpuguard.control": 4,
    # shared checkpoint storage: the supervisor sees it only through ports.SnapshotStore
    "gpuguard.storage": 4,
    # the wiring
    "gpuguard.daemon": 5,
    "gpuguard.metrics": 5,
    # front ends
    "gpuguard.ctl": 6,
    "gpuguard.demo": 6,
}
# what the supervisor's ports may import: it is the supervisor's whole view of the node
PORTS_MAY_IMPORT = {"gpuguard.health.types", "gpuguard.events", "gpuguard.nvml.types"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def gpuguard_imports(path: Path) -> set[str]:
    """Every gpuguard module the file imports at run time, at any depth of the file
    (imports inside functions count too: they are the same dependency, only later)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    # imports only a type checker sees (under `if TYPE_CHECKING:`) are no runtime dependency
    typing_only = {
        id(inner)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
        for inner in ast.walk(block)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("gpuguard")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gpuguard") and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (ROOT.parent / sub.replace(".", "/")).with_suffix(".py").exists() or (ROOT.parent / sub.replace(".", "/")).is_dir() else node.module)
    return found


def layer(name: str) -> int:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[best]


def graph() -> dict[str, set[str]]:
    return {
        module_name(path): gpuguard_imports(path)
        for path in sorted(ROOT.rglob("*.py"))
        if "integrations" not in path.parts
    }


def test_no_module_imports_a_higher_layer() -> None:
    wrong = [
        f"{mod} (layer {layer(mod)}) imports {dep} (layer {layer(dep)})"
        for mod, deps in graph().items()
        for dep in deps
        if layer(dep) > layer(mod)
    ]
    assert wrong == []


def test_the_supervisor_never_reaches_into_the_daemon() -> None:
    wrong = [f"{m} imports {d}" for m, deps in graph().items() if m.startswith("gpuguard.supervisor") for d in deps if d.startswith("gpuguard.daemon")]
    assert wrong == []
    ports = graph()["gpuguard.supervisor.ports"]
    assert not [f"{m} imports {d}" for m, deps in graph().items() if m.startswith("gpuguard.supervisor") for d in deps if d.startswith("gpuguard.storage")]
    assert ports <= PORTS_MAY_IMPORT, ports - PORTS_MAY_IMPORT


def test_no_import_cycle() -> None:
    g = graph()
    # a package's __init__ is not an edge to its submodules: only real module-to-module imports
    state: dict[str, int] = {}  # 1 visiting, 2 done
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for dep in sorted(g.get(node, ())):
            if dep == node or dep not in g:
                continue
            if state.get(dep) == 1:
                cycle.extend(path[path.index(dep) :] + [dep] if dep in path else [node, dep])
                return True
            if state.get(dep) is None and visit(dep, path + [dep]):
                return True
        state[node] = 2
        return False

    for start in sorted(g):
        if state.get(start) is None and visit(start, [start]):
            break
    assert cycle == [], " -> ".join(cycle)


def test_the_job_side_imports_only_the_contract() -> None:
    """gpuguard/integrations/ runs in the trainer: it may use the contract's names and the job's
    stdlib helpers (job.py, fault.py, jobfile.py), nothing of the daemon."""
    wrong = [
        f"{path.name} imports {dep}"
        for path in sorted((ROOT / "integrations").glob("*.py"))
        for dep in gpuguard_imports(path)
        if not dep.startswith(("gpuguard.integrations", "gpuguard.contract", "gpuguard.job", "gpuguard.fault", "gpuguard.jobfile"))
    ]
    assert wrong == []


def test_a_lower_layer_import_is_caught() -> None:
    """The checker itself: an import upward is reported (so the tests above can fail)."""
    assert layer("gpuguard.supervisor.runner") < layer("gpuguard.daemon.service")
    assert layer("gpuguard.health.types") < layer("gpuguard.health.rules")
    assert layer("gpuguard.nvml.types") < layer("gpuguard.nvml.real")


CODE = """
import importlib, pkgutil, sys
import gpuguard
for m in pkgutil.walk_packages(gpuguard.__path__, "gpuguard."):
    if ".integrations" in m.name or m.name.endswith("__main__"):
        continue
    importlib.import_module(m.name)
print(" ".join(sorted(n for n in ("torch", "ultralytics") if n in sys.modules)))
"""


def test_daemon_modules_do_not_import_torch_or_ultralytics() -> None:
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_the_job_helpers_need_only_the_standard_library() -> None:
    """job.py, fault.py and jobfile.py are imported by any trainer, without the daemon's dependencies."""
    wrong = [
        f"{name} imports {dep}"
        for name in ("job.py", "fault.py", "jobfile.py", "contract.py")
        for node in ast.walk(ast.parse((ROOT / name).read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for dep in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""])
        if dep.split(".")[0] not in sys.stdlib_module_names and dep not in ("gpuguard", "gpuguard.contract", "gpuguard.jobfile")
    ]
    assert wrong == []
