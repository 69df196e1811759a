"""deploy/daemonset.yaml: every promise of its header comment and of docs/DEPLOY.md ("On
Kubernetes"), checked on the parsed manifests; the ConfigMap's config.toml loaded by gpuguard's
own loader from the file layout the kubelet gives the container; the liveness probe run
against a real simulated daemon."""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from gpuguard.config import ConfigError, load
from gpuguard.kmsg import reader as kmsg_reader
from harness import BIN, REPO, DaemonProc, wait_until

MANIFEST = REPO / "deploy" / "daemonset.yaml"
DOCS = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
KUBELET_EMPTYDIR_PERM = 0o777  # kubernetes pkg/volume/emptydir/empty_dir.go defaultPerm; configMap volumes wrap it
CONFIGMAP_DEFAULT_MODE = 0o644  # ConfigMapVolumeSource.defaultMode


def kind(name: str) -> dict[str, Any]:
    (doc,) = [d for d in DOCS if d["kind"] == name]
    return doc


DS = kind("DaemonSet")
CM = kind("ConfigMap")
POD = DS["spec"]["template"]["spec"]
(CONTAINER,) = POD["containers"]
VOLUMES = {v["name"]: v for v in POD["volumes"]}
MOUNTS = {m["name"]: m for m in CONTAINER["volumeMounts"]}
CONFIG_TOML = tomllib.loads(CM["data"]["config.toml"])


def mount_for(path: str) -> dict[str, Any]:
    """The volumeMount that holds `path` in the container."""
    found = [m for m in CONTAINER["volumeMounts"] if PurePosixPath(path).is_relative_to(m["mountPath"])]
    assert found, f"nothing is mounted at {path}"
    return max(found, key=lambda m: len(m["mountPath"]))


def host_path(path: str) -> dict[str, Any]:
    volume = VOLUMES[mount_for(path)["name"]]
    assert "hostPath" in volume, f"{path} is not from the host"
    return volume["hostPath"]


def config_arg() -> str:
    command = CONTAINER["command"]
    return command[command.index("--config") + 1]


def test_the_manifests_hang_together() -> None:
    assert [d["kind"] for d in DOCS] == ["Namespace", "ConfigMap", "DaemonSet"]
    namespace = kind("Namespace")["metadata"]["name"]
    assert CM["metadata"]["namespace"] == DS["metadata"]["namespace"] == namespace == "gpuguard"
    assert DS["apiVersion"] == "apps/v1"
    selector = DS["spec"]["selector"]["matchLabels"]
    assert selector.items() <= DS["spec"]["template"]["metadata"]["labels"].items()
    assert set(MOUNTS) == set(VOLUMES), "every volume mounted, every mount backed by a volume"
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert CONTAINER["command"][0] in scripts  # the image's `pip install gpuguard` puts it on PATH
    assert CONTAINER["livenessProbe"]["exec"]["command"][0] in scripts


def test_gpu_nodes_only_and_nvml_from_the_nvidia_runtime() -> None:
    selector = POD["nodeSelector"]
    assert selector == {"nvidia.com/gpu.present": "true"}  # a string: a YAML bool is refused by the API
    assert any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" for t in POD["tolerations"])
    assert POD["runtimeClassName"] == "nvidia"
    env = {e["name"]: e["value"] for e in CONTAINER["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert "utility" in env["NVIDIA_DRIVER_CAPABILITIES"].split(",")  # NVML and nvidia-smi
    resources = CONTAINER["resources"]
    for section in ("requests", "limits"):
        assert not any(k.startswith("nvidia.com/") for k in resources.get(section, {})), "it must take no GPU"


def test_privileged_host_pids_and_priority() -> None:
    assert POD["hostPID"] is True  # NVML names GPU processes by host PID
    assert CONTAINER["securityContext"]["privileged"] is True  # host devices (/dev/kmsg), resets
    assert POD["priorityClassName"] == "system-node-critical"


def test_resources_are_bounded() -> None:
    resources = CONTAINER["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}

    def num(q: str) -> int:
        return int(q[:-2]) * units[q[-2:]]

    assert num(resources["limits"]["memory"]) >= num(resources["requests"]["memory"])


def test_kmsg_is_the_hosts_char_device_read_only() -> None:
    kernel_log = str(load_configmap_config().monitor.kernel_log)
    assert kernel_log == "/dev/kmsg"
    mount = mount_for(kernel_log)
    assert mount["mountPath"] == "/dev/kmsg" and mount.get("readOnly") is True
    assert host_path(kernel_log) == {"path": "/dev/kmsg", "type": "CharDevice"}
    # read-only is enough: the reader never opens it for writing
    assert kmsg_reader._OPEN_FLAGS & os.O_ACCMODE == os.O_RDONLY


def test_socket_and_state_dir_are_the_hosts() -> None:
    config = load_configmap_config()
    socket_dir = str(config.daemon.socket.parent)
    assert str(config.daemon.socket) == "/run/gpuguard/gpuguard.sock"  # where NPD and gpuguardctl on the host look
    assert host_path(socket_dir) == {"path": "/run/gpuguard", "type": "DirectoryOrCreate"}
    assert mount_for(socket_dir)["mountPath"] == socket_dir and not mount_for(socket_dir).get("readOnly")
    state = str(config.daemon.state_dir)
    assert host_path(state) == {"path": "/var/lib/gpuguard", "type": "DirectoryOrCreate"}
    assert mount_for(state)["mountPath"] == state and not mount_for(state).get("readOnly")


def test_metrics_reach_prometheus_on_the_pods_port() -> None:
    metrics = load_configmap_config().metrics
    assert metrics.enabled and metrics.address == "0.0.0.0"  # the pod IP, not loopback
    (port,) = [p for p in CONTAINER["ports"] if p["name"] == "metrics"]
    assert port["containerPort"] == metrics.port and port["protocol"] == "TCP"


def kubelet_layout(rootfs: Path) -> Path:
    """The container's view of the config mount, as the kubelet makes it: a configMap volume is
    a directory of mode 0777 (the emptyDir it wraps) holding `..<timestamp>/KEY` (the file, of
    defaultMode), `..data` -> `..<timestamp>` and `KEY` -> `..data/KEY`. A mount with subPath
    bind-mounts the one file into a directory of the image (root, 0755). Returns the path the
    daemon's --config names, under rootfs."""
    mount = mount_for(config_arg())
    volume = VOLUMES[mount["name"]]
    assert volume["configMap"]["name"] == CM["metadata"]["name"]
    mode = volume["configMap"].get("defaultMode", CONFIGMAP_DEFAULT_MODE)
    content = CM["data"]
    target = rootfs / mount["mountPath"].lstrip("/")
    if "subPath" in mount:
        target.parent.mkdir(parents=True, mode=0o755)
        target.write_text(content[mount["subPath"]])
        target.chmod(mode)
        return rootfs / config_arg().lstrip("/")
    target.mkdir(parents=True)
    target.chmod(KUBELET_EMPTYDIR_PERM)
    stamp = target / "..2026_11_30_12_00_00.000000001"
    stamp.mkdir(mode=0o755)
    for key, text in content.items():
        (stamp / key).write_text(text)
        (stamp / key).chmod(mode)
        (target / key).symlink_to(f"..data/{key}")
    (target / "..data").symlink_to(stamp.name)
    return rootfs / config_arg().lstrip("/")


def load_configmap_config() -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        return load(kubelet_layout(Path(tmp) / "rootfs"))


def test_the_daemon_accepts_the_configmap_as_the_kubelet_mounts_it(tmp_path: Path) -> None:
    """gpuguard refuses a config whose directory others may write (it names commands run as
    root); a whole configMap volume is such a directory (0777), so the DaemonSet mounts the one
    file with subPath, into the image's own /etc/gpuguard."""
    path = kubelet_layout(tmp_path / "rootfs")
    config = load(path)
    assert config.daemon.admin_group == "root" and config.daemon.log_format == "json"
    assert CONFIG_TOML["daemon"]["socket"] == str(config.daemon.socket)
    mount = mount_for(config_arg())
    assert mount.get("subPath") == "config.toml" and mount["mountPath"] == config_arg() == "/etc/gpuguard/config.toml"
    assert mount.get("readOnly") is True


def test_without_subpath_the_daemon_would_refuse_its_config(tmp_path: Path) -> None:
    """The reason for the subPath above, measured with the loader: the whole volume mounted
    as the directory."""
    volume = tmp_path / "etc" / "gpuguard"
    volume.mkdir(parents=True)
    volume.chmod(KUBELET_EMPTYDIR_PERM)
    stamp = volume / "..2026_11_30_12_00_00.000000001"
    stamp.mkdir(mode=0o755)
    (stamp / "config.toml").write_text(CM["data"]["config.toml"])
    (stamp / "config.toml").chmod(CONFIGMAP_DEFAULT_MODE)
    (volume / "..data").symlink_to(stamp.name)
    (volume / "config.toml").symlink_to("..data/config.toml")
    assert stat.S_IMODE(volume.stat().st_mode) == 0o777
    with pytest.raises(ConfigError, match="writable by every user"):
        load(volume / "config.toml")


def liveness(socket: Path) -> int:
    """The probe's command as the kubelet runs it, the DaemonSet's socket mapped to the test's."""
    command = CONTAINER["livenessProbe"]["exec"]["command"]
    argv = [str(BIN / command[0]), *(str(socket) if a == CONFIG_TOML["daemon"]["socket"] else a for a in command[1:])]
    timeout = CONTAINER["livenessProbe"]["timeoutSeconds"]
    return subprocess.run(argv, capture_output=True, timeout=timeout, env={"LANG": "C.UTF-8"}).returncode


@pytest.mark.e2e
def test_liveness_fails_only_for_a_daemon_that_does_not_answer(daemon: DaemonProc, tmp_path: Path) -> None:
    """Its comment: a faulted GPU is no reason to restart the daemon, an unanswering socket is."""
    probe = CONTAINER["livenessProbe"]
    assert "--socket" in probe["exec"]["command"]
    assert probe["exec"]["command"][probe["exec"]["command"].index("--socket") + 1] == CONFIG_TOML["daemon"]["socket"]
    assert liveness(daemon.socket) == 0
    daemon.ctl("inject", "0", "xid", "79")
    wait_until(lambda: daemon.ctl("check", check=False).returncode == 1, 10, "the GPU to fault")
    assert liveness(daemon.socket) == 0
    daemon.stop()
    assert liveness(daemon.socket) != 0
    assert liveness(tmp_path / "never.sock") != 0
