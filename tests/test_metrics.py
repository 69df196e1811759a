"""/metrics over real HTTP from a fake daemon: values follow its status."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from gpuguard.config import ConfigError, MetricsConfig, load
from gpuguard.metrics import MetricsServer, is_loopback, start_metrics_server

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus-rules.yml"
A = {"uuid": "GPU-aaaa", "index": "0", "pci_bus_id": "00000000:3B:00.0"}
B = {"uuid": "GPU-bbbb", "index": "1", "pci_bus_id": "00000000:86:00.0"}

STATUS: dict[str, Any] = {
    "daemon": {"version": "0.1.0", "backend": "simulated", "driver_version": "550.54.15", "last_poll_at": 1700000000.5},
    "gpus": [
        {
            "index": 0, "uuid": A["uuid"], "pci_bus_id": A["pci_bus_id"], "name": "NVIDIA H100 80GB HBM3",
            "state": "healthy", "reason": None, "gpu_util_pct": 40, "mem_util_pct": 10,
            "memory_used_bytes": 1024**3, "memory_total_bytes": 80 * 1024**3, "temperature_c": 55,
            "power_w": 250.5, "power_limit_w": 700.0, "sm_clock_mhz": 1980,
            "ecc_volatile_corrected": 3, "ecc_volatile_uncorrected": 0,
            "ecc_aggregate_corrected": 12, "ecc_aggregate_uncorrected": 0,
            "remap_correctable": 1, "remap_uncorrectable": 0, "remap_pending": False, "remap_failure": False,
            "retired_pages_sbe": 0, "retired_pages_dbe": 0, "retired_pages_pending": False,
            "pcie_replay_counter": 7, "nvlink_crc_errors": 2, "hw_slowdown": False,
        },
        {
            "index": 1, "uuid": B["uuid"], "pci_bus_id": B["pci_bus_id"], "name": "NVIDIA H100 80GB HBM3",
            "state": "faulted", "reason": "Xid 79: GPU has fallen off the bus", "gpu_util_pct": None,
            "temperature_c": None, "power_w": None, "ecc_volatile_uncorrected": None, "remap_pending": True,
        },
    ],
    "jobs": [
        {"name": "yolo", "state": "running", "gpus": [A["uuid"]], "attempt": 3, "restarts": 2, "pid": 4242,
         "checkpoint": "/srv/last.pt", "checkpoint_age_s": 95.5},
        {"name": "bert", "state": "waiting", "gpus": [], "attempt": 1, "restarts": 0, "pid": None,
         "checkpoint": None, "checkpoint_age_s": None},
    ],
}  # fmt: skip


class FakeDaemon:
    """What the collector reads; tests change its status between scrapes."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.state = copy.deepcopy(STATUS)
        self.xids: dict[tuple[str, int], int] = {(B["uuid"], 79): 1}
        self.status_calls = 0

    def status(self) -> dict[str, Any]:
        self.status_calls += 1
        return self.state

    def xid_counts(self) -> dict[tuple[str, int], int]:
        return dict(self.xids)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[FakeDaemon, MetricsServer]]:
    """One server for the module: stopping one takes half a second (its poll interval)."""
    fake = FakeDaemon()
    running = start_metrics_server(MetricsConfig(enabled=True, address="127.0.0.1", port=0), fake)
    yield fake, running
    running.stop()


@pytest.fixture
def daemon(served: tuple[FakeDaemon, MetricsServer]) -> FakeDaemon:
    served[0].reset()
    return served[0]


@pytest.fixture
def server(served: tuple[FakeDaemon, MetricsServer]) -> MetricsServer:
    return served[1]


def scrape_text(server: MetricsServer) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as reply:
        assert reply.status == 200
        return reply.read().decode()


def scrape(server: MetricsServer) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(scrape_text(server))
        for s in family.samples
    }


def value(samples: Samples, metric: str, **labels: str) -> float | None:
    return samples.get((metric, frozenset(labels.items())))


def test_values_follow_the_status(server: MetricsServer, daemon: FakeDaemon) -> None:
    s = scrape(server)
    assert daemon.status_calls == 1  # one status() per scrape
    assert value(s, "gpuguard_build_info", version="0.1.0", backend="simulated", driver_version="550.54.15") == 1
    assert value(s, "gpuguard_last_poll_timestamp_seconds") == 1700000000.5
    assert value(s, "gpuguard_gpu_info", **A, name="NVIDIA H100 80GB HBM3") == 1
    for state in ("healthy", "degraded", "faulted", "excluded", "resetting", "unknown"):
        assert value(s, "gpuguard_gpu_state", **A, state=state) == (state == "healthy")
        assert value(s, "gpuguard_gpu_state", **B, state=state) == (state == "faulted")
    assert value(s, "gpuguard_gpu_healthy", **A) == 1 and value(s, "gpuguard_gpu_healthy", **B) == 0
    assert value(s, "gpuguard_xid_total", **B, xid="79") == 1
    assert value(s, "gpuguard_gpu_ecc_errors_total", **A, type="corrected", scope="volatile") == 3
    assert value(s, "gpuguard_gpu_ecc_errors_total", **A, type="corrected", scope="aggregate") == 12
    assert value(s, "gpuguard_gpu_ecc_errors_total", **A, type="uncorrected", scope="volatile") == 0
    assert value(s, "gpuguard_gpu_pcie_replays_total", **A) == 7
    assert value(s, "gpuguard_gpu_nvlink_errors_total", **A, type="crc") == 2
    assert value(s, "gpuguard_gpu_remapped_rows", **A, cause="correctable") == 1
    assert value(s, "gpuguard_gpu_retired_pages", **A, cause="sbe") == 0
    assert value(s, "gpuguard_gpu_row_remap_pending", **A) == 0 and value(s, "gpuguard_gpu_row_remap_pending", **B) == 1
    assert value(s, "gpuguard_gpu_throttled", **A, reason="hw_slowdown") == 0
    assert value(s, "gpuguard_gpu_utilization_ratio", **A) == pytest.approx(0.4)
    assert value(s, "gpuguard_gpu_memory_used_bytes", **A) == 1024**3
    assert value(s, "gpuguard_gpu_memory_total_bytes", **A) == 80 * 1024**3
    assert value(s, "gpuguard_gpu_temperature_celsius", **A) == 55
    assert value(s, "gpuguard_gpu_power_watts", **A) == 250.5 and value(s, "gpuguard_gpu_power_limit_watts", **A) == 700
    assert value(s, "gpuguard_gpu_sm_clock_hertz", **A) == 1980e6
    assert value(s, "gpuguard_job_state", job_name="yolo", state="running") == 1
    assert value(s, "gpuguard_job_state", job_name="yolo", state="failed") == 0
    assert value(s, "gpuguard_job_state", job_name="bert", state="waiting") == 1
    assert value(s, "gpuguard_job_restarts_total", job_name="yolo") == 2
    assert value(s, "gpuguard_job_checkpoint_age_seconds", job_name="yolo") == 95.5


def test_none_values_are_skipped_and_only_gpuguard_metrics_are_served(server: MetricsServer) -> None:
    s = scrape(server)
    for name in ("gpuguard_gpu_temperature_celsius", "gpuguard_gpu_power_watts", "gpuguard_gpu_utilization_ratio"):
        assert value(s, name, **B) is None
    assert value(s, "gpuguard_gpu_ecc_errors_total", **B, type="uncorrected", scope="volatile") is None
    assert value(s, "gpuguard_job_checkpoint_age_seconds", job_name="bert") is None
    assert {name for name, _ in s} and all(name.startswith("gpuguard_") for name, _ in s)  # no process_/python_ metrics


def test_values_follow_injected_faults(server: MetricsServer, daemon: FakeDaemon) -> None:
    gpu = daemon.state["gpus"][0]
    gpu.update(state="faulted", reason="Xid 48: double-bit ECC", ecc_volatile_uncorrected=1, temperature_c=91)
    daemon.xids[(A["uuid"], 48)] = 1
    daemon.xids[(B["uuid"], 79)] = 2
    daemon.state["jobs"][0].update(state="checkpointing", restarts=3)
    s = scrape(server)
    assert value(s, "gpuguard_gpu_state", **A, state="faulted") == 1 and value(s, "gpuguard_gpu_state", **A, state="healthy") == 0
    assert value(s, "gpuguard_gpu_healthy", **A) == 0
    assert value(s, "gpuguard_gpu_ecc_errors_total", **A, type="uncorrected", scope="volatile") == 1
    assert value(s, "gpuguard_gpu_temperature_celsius", **A) == 91
    assert value(s, "gpuguard_xid_total", **A, xid="48") == 1 and value(s, "gpuguard_xid_total", **B, xid="79") == 2
    assert value(s, "gpuguard_job_state", job_name="yolo", state="checkpointing") == 1
    assert value(s, "gpuguard_job_restarts_total", job_name="yolo") == 3


def test_no_jobs_no_gpus_still_serves_build_info(server: MetricsServer, daemon: FakeDaemon) -> None:
    daemon.state = {"daemon": {"version": "0.1.0", "backend": "nvml", "driver_version": None}, "gpus": [], "jobs": []}
    daemon.xids = {}
    s = scrape(server)
    assert s == {("gpuguard_build_info", frozenset({"version": "0.1.0", "backend": "nvml", "driver_version": ""}.items())): 1}


def test_stop_closes_the_port(daemon: FakeDaemon) -> None:
    running = start_metrics_server(MetricsConfig(enabled=True, port=0), daemon)
    port = running.port
    running.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_a_non_loopback_address_is_allowed_with_a_warning(daemon: FakeDaemon) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("node1.example")
    with capture_logs() as logs:
        running = start_metrics_server(MetricsConfig(enabled=True, address="0.0.0.0", port=0), daemon)
    running.stop()
    assert any(e["event"] == "metrics_exposed" and e["log_level"] == "warning" for e in logs)


# -- the exposition and the alerting rules, checked by Prometheus's own tool

promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus; .ci/run installs it)")


@promtool
def test_promtool_accepts_the_exposition(server: MetricsServer) -> None:
    text = scrape_text(server)
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


@promtool
def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


@promtool
def test_the_faulted_and_first_xid_alerts_fire(tmp_path: Path) -> None:
    gpu = 'uuid="GPU-bbbb",index="1",pci_bus_id="00000000:86:00.0",instance="node1:9402",job="gpuguard"'
    labels = {"uuid": "GPU-bbbb", "index": "1", "pci_bus_id": "00000000:86:00.0", "instance": "node1:9402", "job": "gpuguard"}
    unit = {  # JSON is YAML, so promtool reads it as a rules unit test
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": f"gpuguard_gpu_state{{{gpu},state=\"faulted\"}}", "values": "0 0 1x10"},
                    {"series": f"gpuguard_xid_total{{{gpu},xid=\"79\"}}", "values": "_ _ 1x10"},
                ],
                "alert_rule_test": [
                    {"eval_time": "2m", "alertname": "GpuguardGpuFaulted", "exp_alerts": []},
                    {
                        "eval_time": "4m",
                        "alertname": "GpuguardGpuFaulted",
                        "exp_alerts": [
                            {
                                "exp_labels": {**labels, "state": "faulted", "severity": "critical"},
                                "exp_annotations": {
                                    "summary": "GPU 1 on node1:9402 is faulted",
                                    "description": "GPU 1 (GPU-bbbb, 00000000:86:00.0) must not run work. "
                                    "Run `gpuguardctl status` on the node for the reason.",
                                },
                            }
                        ],
                    },
                    {
                        "eval_time": "3m",
                        "alertname": "GpuguardXid",
                        "exp_alerts": [
                            {
                                "exp_labels": {**labels, "xid": "79", "severity": "warning"},
                                "exp_annotations": {
                                    "summary": "Xid 79 on GPU 1 of node1:9402",
                                    "description": "NVIDIA Xid 79 on GPU 1 (GPU-bbbb); gpuguard acts on it per NVIDIA's "
                                    "Xid catalog (`gpuguardctl events --gpu 1`).",
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    }
    test_file = tmp_path / "gpuguard-rules-test.yml"
    test_file.write_text(json.dumps(unit))
    result = subprocess.run(["promtool", "test", "rules", str(test_file)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# -- the [metrics] checks of the config loader


@pytest.mark.parametrize(
    ("toml", "key", "problem"),
    [
        ("[metrics]\nport = 0\n", "metrics.port", "must be a TCP port, 1 to 65535; got 0"),
        ("[metrics]\nport = 65536\n", "metrics.port", "must be a TCP port, 1 to 65535; got 65536"),
        ('[metrics]\naddress = ""\n', "metrics.address", "must not be empty"),
    ],
)
def test_bad_metrics_config_names_the_key(tmp_path: Path, toml: str, key: str, problem: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.key == key and problem in info.value.problem
