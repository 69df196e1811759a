"""Prometheus exposition of what the daemon already knows.

Metrics are built at scrape time from one `status()` call and the Xid
counts: a scrape never touches NVML, so a hung GPU or a slow scraper cannot
stall the other. Names follow Prometheus conventions: a `gpuguard_` prefix,
base units in the name (bytes, celsius, watts, hertz, seconds, ratios 0..1)
and `_total` on counters. States are exposed as the enum-as-gauge pattern: one
series per possible state, 1 for the current one, so PromQL can compare and
alert on a state without string parsing.

Jobs are labelled `job_name`, not `job`: Prometheus sets `job` on every
scraped series itself and would rename ours to `exported_job`.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from gpuguard.config import MetricsConfig
from gpuguard.health.types import GpuState
from gpuguard.supervisor.states import JobState

log = structlog.get_logger("gpuguard.metrics")

GPU_LABELS = ("uuid", "index", "pci_bus_id")
STOP_JOIN_S = 5.0


class StatusSource(Protocol):
    """What the collector reads: the daemon (or a fake of it in tests)."""

    def status(self) -> dict[str, Any]: ...

    def xid_counts(self) -> dict[tuple[str, int], int]: ...


@dataclass(frozen=True)
class _Series:
    """One per-GPU metric family: where its values are in a GPU's status entry.
    `values` maps the extra label values of each series to a status key."""

    family: type[GaugeMetricFamily] | type[CounterMetricFamily]
    name: str
    doc: str
    values: dict[tuple[str, ...], str]
    labels: tuple[str, ...] = ()
    scale: float = 1.0  # to base units: percent to ratio, MHz to Hz


def _gauge(name: str, doc: str, key: str, scale: float = 1.0) -> _Series:
    return _Series(GaugeMetricFamily, name, doc, {(): key}, scale=scale)


_GPU_SERIES: tuple[_Series, ...] = (
    _gauge("gpuguard_gpu_utilization_ratio", "Share of time a kernel ran on the GPU, 0 to 1.", "gpu_util_pct", 0.01),
    _gauge("gpuguard_gpu_memory_utilization_ratio", "Share of time GPU memory was busy, 0 to 1.", "mem_util_pct", 0.01),
    _gauge("gpuguard_gpu_memory_used_bytes", "GPU memory in use.", "memory_used_bytes"),
    _gauge("gpuguard_gpu_memory_total_bytes", "GPU memory in all.", "memory_total_bytes"),
    _gauge("gpuguard_gpu_temperature_celsius", "GPU core temperature.", "temperature_c"),
    _gauge("gpuguard_gpu_power_watts", "GPU power draw.", "power_w"),
    _gauge("gpuguard_gpu_power_limit_watts", "GPU power limit.", "power_limit_w"),
    _gauge("gpuguard_gpu_sm_clock_hertz", "GPU SM clock.", "sm_clock_mhz", 1e6),
    _gauge("gpuguard_gpu_row_remap_pending", "1 when remapped rows wait for a GPU reset.", "remap_pending"),
    _gauge("gpuguard_gpu_row_remap_failed", "1 when a row remap failed: the GPU needs service.", "remap_failure"),
    _gauge("gpuguard_gpu_retired_pages_pending", "1 when retired pages wait for a GPU reset.", "retired_pages_pending"),
    _gauge(
        "gpuguard_gpu_recovery_action",
        "NVML's recovery action: 0 none, 1 reset, 2 reboot, 3 drain P2P, 4 drain and reset.",
        "recovery_action",
    ),
    _gauge("gpuguard_gpu_sampled_timestamp_seconds", "When this GPU was last sampled (Unix time).", "sampled_at"),
    _Series(
        CounterMetricFamily,
        "gpuguard_gpu_ecc_errors_total",
        "ECC errors; volatile since the last driver load, aggregate over the GPU's life.",
        {
            (kind, scope): f"ecc_{scope}_{kind}"
            for kind in ("corrected", "uncorrected")
            for scope in ("volatile", "aggregate")
        },
        labels=("type", "scope"),
    ),
    _Series(
        CounterMetricFamily, "gpuguard_gpu_pcie_replays_total", "PCIe replays of the GPU's link.", {(): "pcie_replay_counter"}
    ),
    _Series(
        CounterMetricFamily,
        "gpuguard_gpu_nvlink_errors_total",
        "NVLink errors summed over the GPU's links.",
        {("crc",): "nvlink_crc_errors", ("replay",): "nvlink_replay_errors", ("recovery",): "nvlink_recovery_errors"},
        labels=("type",),
    ),
    _Series(
        GaugeMetricFamily,
        "gpuguard_gpu_remapped_rows",
        "Rows of GPU memory remapped, by the kind of error that caused it.",
        {("correctable",): "remap_correctable", ("uncorrectable",): "remap_uncorrectable"},
        labels=("cause",),
    ),
    _Series(
        GaugeMetricFamily,
        "gpuguard_gpu_retired_pages",
        "GPU memory pages retired, by the kind of error that caused it.",
        {("sbe",): "retired_pages_sbe", ("dbe",): "retired_pages_dbe"},
        labels=("cause",),
    ),
    _Series(
        GaugeMetricFamily,
        "gpuguard_gpu_throttled",
        "1 while the GPU's clocks are held down for this reason.",
        {("hw_slowdown",): "hw_slowdown", ("thermal",): "thermal_slowdown", ("power_brake",): "power_brake"},
        labels=("reason",),
    ),
)


def _gpu_labels(gpu: dict[str, Any]) -> list[str]:
    return [str(gpu.get("uuid", "")), str(gpu.get("index", "")), str(gpu.get("pci_bus_id") or "")]


def _number(value: Any) -> float | None:
    """A status value as a sample value; None (not available) stays None."""
    if value is None:
        return None
    return float(value)


def _enum_family(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=[*labels, "state"])


class GpuguardCollector(Collector):
    """Builds every gpuguard metric from one snapshot of the daemon's status."""

    def __init__(self, source: StatusSource) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        status = self._source.status()
        xids = self._source.xid_counts()
        gpus = status.get("gpus", [])
        families = [
            *self._daemon_metrics(status.get("daemon", {})),
            *self._gpu_metrics(gpus),
            self._xid_metric(gpus, xids),
            *self._job_metrics(status.get("jobs", [])),
        ]
        # a family with no sample (no jobs, a metric no GPU supports) is left out
        return [family for family in families if family.samples]

    def _daemon_metrics(self, daemon: dict[str, Any]) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "gpuguard_build_info",
            "gpuguard's version, GPU backend and NVIDIA driver; always 1.",
            labels=["version", "backend", "driver_version"],
        )
        info.add_metric([str(daemon.get(key) or "") for key in ("version", "backend", "driver_version")], 1)
        yield info
        last_poll = _number(daemon.get("last_poll_at"))
        if last_poll is not None:
            yield GaugeMetricFamily(
                "gpuguard_last_poll_timestamp_seconds", "When the daemon last polled all GPUs (Unix time).", value=last_poll
            )

    def _gpu_metrics(self, gpus: list[dict[str, Any]]) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "gpuguard_gpu_info", "A GPU this daemon watches, with its model name; always 1.", labels=[*GPU_LABELS, "name"]
        )
        state = _enum_family("gpuguard_gpu_state", "1 for the GPU's current state, 0 for the others.", list(GPU_LABELS))
        healthy = GaugeMetricFamily(
            "gpuguard_gpu_healthy", "1 when the GPU is healthy: a scheduler may give it work.", labels=list(GPU_LABELS)
        )
        families = [series.family(series.name, series.doc, labels=[*GPU_LABELS, *series.labels]) for series in _GPU_SERIES]
        for gpu in gpus:
            labels = _gpu_labels(gpu)
            info.add_metric([*labels, str(gpu.get("name") or "")], 1)
            for value in GpuState:
                state.add_metric([*labels, value.value], 1 if gpu.get("state") == value.value else 0)
            healthy.add_metric(labels, 1 if gpu.get("state") == GpuState.HEALTHY.value else 0)
            for series, family in zip(_GPU_SERIES, families, strict=True):
                for extra, key in series.values.items():
                    number = _number(gpu.get(key))
                    if number is not None:
                        family.add_metric([*labels, *extra], number * series.scale)
        yield from (info, state, healthy, *families)

    def _xid_metric(self, gpus: list[dict[str, Any]], xids: dict[tuple[str, int], int]) -> Metric:
        by_uuid = {gpu.get("uuid"): gpu for gpu in gpus}
        family = CounterMetricFamily(
            "gpuguard_xid_total", "NVIDIA Xid errors seen since the daemon started.", labels=[*GPU_LABELS, "xid"]
        )
        for (uuid, xid), count in sorted(xids.items()):
            family.add_metric([*_gpu_labels(by_uuid.get(uuid, {"uuid": uuid})), str(xid)], count)
        return family

    def _job_metrics(self, jobs: list[dict[str, Any]]) -> Iterator[Metric]:
        state = _enum_family("gpuguard_job_state", "1 for the managed job's current state, 0 for the others.", ["job_name"])
        restarts = CounterMetricFamily("gpuguard_job_restarts_total", "Restarts of the managed job.", labels=["job_name"])
        age = GaugeMetricFamily(
            "gpuguard_job_checkpoint_age_seconds", "Age of the job's newest validated checkpoint.", labels=["job_name"]
        )
        for job in jobs:
            name = str(job.get("name", ""))
            for value in JobState:
                state.add_metric([name, value.value], 1 if job.get("state") == value.value else 0)
            for family, key in ((restarts, "restarts"), (age, "checkpoint_age_s")):
                number = _number(job.get(key))
                if number is not None:
                    family.add_metric([name], number)
        yield from (state, restarts, age)


@dataclass
class MetricsServer:
    """The running HTTP endpoint; `stop()` closes its socket and ends its thread."""

    httpd: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The bound port (the one the kernel chose when asked for port 0)."""
        return int(self.httpd.server_port)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(STOP_JOIN_S)


def is_loopback(address: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def start_metrics_server(config: MetricsConfig, source: StatusSource) -> MetricsServer:
    """Serve /metrics on config.address:config.port from a registry holding only
    gpuguard's collector (no process or Python metrics of the default registry).
    Raises OSError when the address cannot be bound."""
    if not is_loopback(config.address):
        log.warning(
            "metrics_exposed", address=config.address, port=config.port, detail="metrics are reachable beyond this machine"
        )
    registry = CollectorRegistry()
    registry.register(GpuguardCollector(source))
    httpd, thread = start_http_server(config.port, addr=config.address, registry=registry)
    server = MetricsServer(httpd, thread)
    log.info("metrics_serving", address=config.address, port=server.port)
    return server
