"""systemd/gpuguard.service: the hardening it carries, and the proof of each capability it keeps.

Jobs are children of the service and inherit its sandbox (docs/DEPLOY.md,
"Unit hardening"). So the unit is read as data here: what must stay for
jobs stays, the capability bounding set is the documented one, and each
capability the daemon keeps is measured: with the unit's set the daemon's
privileged steps work, and without that one capability its step fails.
`systemd-analyze verify` itself runs in tests/daemon/test_daemon_e2e.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
UNIT = ROOT / "systemd" / "gpuguard.service"
DEPLOY = ROOT / "docs" / "DEPLOY.md"

# capability -> the probe step (below) that fails without it
PROBED = {
    "CAP_SETUID": "spawn",
    "CAP_SETGID": "spawn",
    "CAP_CHOWN": "chown",
    "CAP_FOWNER": "fowner",
    "CAP_DAC_OVERRIDE": "dac",
    "CAP_KILL": "kill",
    "CAP_SYS_PTRACE": "ptrace",
    "CAP_SYSLOG": "kmsg",
    "CAP_SYS_RESOURCE": "oom",
    "CAP_MKNOD": "mknod",
    "CAP_IPC_LOCK": "mlock",
}
# kept for reasons a test cannot replay here
NOT_PROBED = {
    "CAP_SYS_ADMIN": "GPU reset and NVML's privileged calls: the driver tests capable(CAP_SYS_ADMIN)",
    "CAP_AUDIT_WRITE": "sudo in a job writes its audit record",
}
ADDRESS_FAMILIES = {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
TRUE = {"yes", "true", "on", "1"}


def directives(section: str = "Service") -> dict[str, list[str]]:
    """Every assignment of one section, in order (a key set twice keeps both values)."""
    found: dict[str, list[str]] = {}
    current = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            continue
        if current == section and "=" in line:
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def setting(key: str) -> str | None:
    values = directives().get(key)
    return values[-1] if values else None


def bounding_set() -> set[str]:
    return set((setting("CapabilityBoundingSet") or "").split())


def documented_caps() -> set[str]:
    """The capabilities named in the first column of DEPLOY.md's capability table."""
    return set(re.findall(r"^\| `(CAP_[A-Z_]+)`", DEPLOY.read_text(), re.MULTILINE))


def test_bounding_set_is_the_documented_one() -> None:
    caps = bounding_set()
    assert caps == set(PROBED) | set(NOT_PROBED), "every capability kept is probed below or named as not probable"
    assert caps == documented_caps(), "docs/DEPLOY.md's capability table must list exactly the unit's set"
    assert "CAP_SYS_MODULE" not in caps and "CAP_SYS_TIME" not in caps and "CAP_NET_ADMIN" not in caps
    assert setting("AmbientCapabilities") == ""


def test_jobs_keep_what_training_needs() -> None:
    """Settings a job would inherit and suffer from stay off (DEPLOY.md says why, one by one)."""
    d = directives()
    for key in ("NoNewPrivileges", "RestrictNamespaces", "PrivateDevices", "ProtectClock", "ProtectKernelLogs",
                "ProtectControlGroups", "PrivateTmp", "MemoryDenyWriteExecute", "PrivateNetwork", "PrivateUsers"):
        assert (setting(key) or "no") not in TRUE, f"{key}= would reach every job"
    for key in ("DeviceAllow", "DevicePolicy", "ProtectSystem", "ProtectHome", "ProtectProc", "ProcSubset",
                "IPAddressDeny", "User", "DynamicUser"):
        assert key not in d, f"{key}= would reach every job or the daemon's root work"
    assert set((setting("RestrictAddressFamilies") or "").split()) == ADDRESS_FAMILIES
    # a deny list only, without the groups debuggers, containers, sudo and NUMA binding use
    syscall_filter = setting("SystemCallFilter") or ""
    assert syscall_filter.startswith("~")
    for group in ("@debug", "@mount", "@privileged", "@resources", "@system-service", "@process", "@network-io"):
        assert group not in syscall_filter.split()
    assert setting("SystemCallErrorNumber") == "EPERM", "a filtered call must fail, not kill a training job"


def test_daemon_keeps_its_own_settings() -> None:
    assert setting("KillMode") == "process"
    assert setting("Delegate") in TRUE
    assert int(setting("OOMScoreAdjust") or "0") < 0
    assert setting("ProtectKernelModules") in TRUE
    # CUDA cannot load nvidia-uvm from inside the sandbox: the unit loads it, outside it, or starts without it
    assert any(v.startswith(("-+", "+-")) and "nvidia-modprobe" in v for v in directives().get("ExecStartPre", []))


def analyze_security() -> tuple[float, int]:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    version = subprocess.run(["systemd-analyze", "--version"], capture_output=True, text=True, timeout=30)
    major = int(re.match(r"systemd (\d+)", version.stdout).group(1))  # type: ignore[union-attr]
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True, text=True, timeout=60,
    )
    found = re.search(r"Overall exposure level for gpuguard\.service: (\d+\.\d)", result.stdout)
    if found is None:
        pytest.skip(f"systemd {major} cannot score a unit file offline: {result.stderr.strip()[:200]}")
    return float(found.group(1)), major


def test_exposure_score_is_the_documented_one() -> None:
    score, major = analyze_security()
    recorded = re.search(
        r"systemd\s+(\d+)\s+\(([^)]+)\):\s+\*\*(\d+\.\d) [A-Z]+\*\*\s+before,\s+\*\*(\d+\.\d) [A-Z]+\*\*\s+after",
        DEPLOY.read_text(),
    )
    assert recorded is not None, "docs/DEPLOY.md records the score before and after, with the systemd version"
    doc_major, before, after = int(recorded.group(1)), float(recorded.group(3)), float(recorded.group(4))
    if major == doc_major:
        assert score == after, f"systemd-analyze says {score}, docs/DEPLOY.md says {after}: update one of them"
    else:  # other versions weigh settings differently; the hardening must still show
        assert score < before


# ---------------------------------------------------------------------------
# Each capability, measured: a probe runs the daemon's privileged steps under
# a bounding set, as root, the way systemd starts gpuguardd.

PROBE = r"""
import ctypes, json, mmap, os, resource, stat, sys, time
from pathlib import Path
from gpuguard.supervisor import pids
from gpuguard.supervisor.process import UserSpec, spawn

args = json.loads(sys.argv[1])
work, victim, nobody = Path(args["work"]), args["victim"], UserSpec.lookup("nobody")
results = {}

def step(name):
    def run(fn):
        try:
            out = fn()
            results[name] = "ok" if out is None else out
        except Exception as exc:
            results[name] = f"error: {type(exc).__name__}: {exc}"
    return run

@step("spawn")  # the wrapper takes the job user's gid, groups and uid (and chowns the job's log)
def _():
    logs = work / "logs"
    logs.mkdir(mode=0o700, exist_ok=True)
    job = spawn(["/bin/true"], env={"PATH": "/usr/bin:/bin"}, cwd=Path("/"), user=nobody, log_path=logs / "out.log")
    code = job.wait(10)
    assert code == 0, f"exit {code}: {(logs / 'out.log').read_text()!r}"

@step("chown")  # runtime dir, log and snapshot copies belong to the job's user
def _():
    f = work / "mine"
    f.write_text("")
    os.chown(f, nobody.uid, nobody.gid)

@step("fowner")  # a snapshot copy keeps the checkpoint's mtime after it was chowned
def _():
    os.utime(args["nobody_file"], ns=(0, 0))

@step("dac")  # append to a job's log owned by its user, in a directory of the user's
def _():
    with open(args["private_file"], "a") as f:
        f.write("x")

@step("kill")  # signals to job trees of other users (0: the permission check alone)
def _():
    os.kill(victim, 0)

@step("ptrace")  # the wrapper's mark in a job process's environment, a foreign holder's executable
def _():
    assert pids.marked(victim) == 4242, "mark not readable"
    os.readlink(f"/proc/{victim}/exe")

@step("kmsg")  # the kernel log, under kernel.dmesg_restrict=1
def _():
    if not os.path.exists("/dev/kmsg") or Path("/proc/sys/kernel/dmesg_restrict").read_text().strip() != "1":
        return "skip"
    os.close(os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK))

@step("oom")  # the wrapper's 0 becomes the floor: a job cannot return to the daemon's -500
def _():
    Path("/proc/self/oom_score_adj").write_text("0")
    pid = os.fork()
    if pid == 0:  # a job: its user's ids, then exec (which makes its /proc files its own)
        try:
            os.setgroups([])
            os.setresgid(nobody.gid, nobody.gid, nobody.gid)
            os.setresuid(nobody.uid, nobody.uid, nobody.uid)
            os.execv("/bin/sh", ["sh", "-c", "{ echo -500 > /proc/self/oom_score_adj; } 2>/dev/null || exit 3"])
        finally:
            os._exit(4)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    assert code == 3, "the job lowered its OOM score to -500" if code == 0 else f"the job exited {code}"

@step("mknod")  # what nvidia-modprobe does for /dev/nvidia-uvm and /dev/nvidia-caps/*
def _():
    node = work / "node"
    node.unlink(missing_ok=True)
    os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(1, 3))

@step("mlock")  # pinning memory past RLIMIT_MEMLOCK, as RDMA registration does
def _():
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 * 1024, 64 * 1024))
    size = 4 * 1024 * 1024
    buf = mmap.mmap(-1, size)
    libc = ctypes.CDLL(None, use_errno=True)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    if libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(size)) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    libc.munlock(ctypes.c_void_p(addr), ctypes.c_size_t(size))

print(json.dumps(results))
"""


def effective_caps() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def cap_number(name: str) -> int:
    numbers = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3, "CAP_KILL": 5, "CAP_SETGID": 6,
               "CAP_SETUID": 7, "CAP_IPC_LOCK": 14, "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21,
               "CAP_SYS_RESOURCE": 24, "CAP_MKNOD": 27, "CAP_AUDIT_WRITE": 29, "CAP_SYSLOG": 34}
    return numbers[name]


@pytest.fixture(scope="module")
def probe_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    if os.geteuid() != 0:
        pytest.skip("the probe runs as root, as gpuguardd does")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) not installed")
    import pwd

    nobody = pwd.getpwnam("nobody")
    work = tmp_path_factory.mktemp("caps")
    os.chmod(work, 0o700)
    owned = work / "nobody-file"
    owned.write_text("")
    os.chown(owned, nobody.pw_uid, nobody.pw_gid)
    private = work / "nobody-dir"
    private.mkdir(mode=0o700)
    (private / "log").write_text("")
    os.chmod(private / "log", 0o600)
    os.chown(private / "log", nobody.pw_uid, nobody.pw_gid)
    os.chown(private, nobody.pw_uid, nobody.pw_gid)
    victim = subprocess.Popen(["sleep", "600"], user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[],
                              env={"GPUGUARD_WRAPPER_PID": "4242"})
    try:
        yield {"work": str(work), "victim": victim.pid, "nobody_file": str(owned),
               "private_file": str(private / "log")}
    finally:
        victim.kill()
        victim.wait()


def daemon_oom_score() -> None:
    """The probe starts as systemd starts gpuguardd: OOMScoreAdjust=-500, also its floor."""
    try:
        Path("/proc/self/oom_score_adj").write_text("-500")
    except OSError:  # without CAP_SYS_RESOURCE here: the oom step is not judged
        pass


def run_probe(env: dict[str, object], caps: set[str]) -> dict[str, str]:
    keep = ",".join("+" + c.removeprefix("CAP_").lower() for c in sorted(caps))
    result = subprocess.run(
        ["setpriv", "--bounding-set", "-all" + ("," + keep if keep else ""), "--inh-caps", "-all",
         "--", sys.executable, "-c", PROBE, json.dumps(env)],
        capture_output=True, text=True, timeout=60,
        preexec_fn=daemon_oom_score,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def held(cap: str) -> bool:
    """Whether this test process has the capability to hand on (a container may lack some)."""
    return bool(effective_caps() >> cap_number(cap) & 1)


@pytest.mark.e2e
@pytest.mark.root
def test_the_units_capabilities_suffice(probe_env: dict[str, object]) -> None:
    results = run_probe(probe_env, bounding_set())
    assert set(results) == set(PROBED.values())
    # a step is owed only where this process holds every capability it needs to pass on
    needs: dict[str, set[str]] = {"spawn": {"CAP_CHOWN"}}
    for cap, step in PROBED.items():
        needs.setdefault(step, set()).add(cap)
    owed = {step: v for step, v in results.items() if all(held(c) for c in needs[step])}
    assert len(owed) >= len(results) // 2, f"too few capabilities here to judge: {results}"
    assert all(v in ("ok", "skip") for v in owed.values()), results


@pytest.mark.parametrize("cap", sorted(PROBED))
@pytest.mark.e2e
@pytest.mark.root
def test_each_kept_capability_is_needed(probe_env: dict[str, object], cap: str) -> None:
    if not held(cap):
        pytest.skip(f"this test process lacks {cap}, so the probe cannot show it matters")
    results = run_probe(probe_env, bounding_set() - {cap})
    step = PROBED[cap]
    if results[step] == "skip":
        pytest.skip(f"{step} cannot be checked on this host")
    assert results[step].startswith("error"), f"{step} still works without {cap}: drop {cap} from the unit"
