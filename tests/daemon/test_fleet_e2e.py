"""Metrics and node hooks on a real gpuguardd (--simulate 2)."""

from __future__ import annotations

import json
import socket
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import running_daemon, wait_until

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _value(samples: dict, name: str, **labels: str) -> float | None:
    for (n, lbls), value in samples.items():
        if n == name and all(dict(lbls).get(k) == v for k, v in labels.items()):
            return value
    return None


def test_metrics_follow_injected_faults(tmp_path: Path) -> None:
    port = _free_port()
    with running_daemon(tmp_path, extra_config=f"[metrics]\nenabled = true\nport = {port}\n") as proc:
        before = _scrape(port)
        assert _value(before, "gpuguard_gpu_healthy", index="1") == 1.0
        assert _value(before, "gpuguard_build_info", backend="simulated") == 1.0
        proc.ctl("inject", "1", "xid", "79")
        proc.wait_for(lambda s: s["gpus"][1]["state"] == "faulted", what="GPU 1 faulted")
        after = _scrape(port)
        assert _value(after, "gpuguard_gpu_healthy", index="1") == 0.0
        assert _value(after, "gpuguard_gpu_state", index="1", state="faulted") == 1.0
        assert _value(after, "gpuguard_xid_total", index="1", xid="79") == 1.0
        assert _value(after, "gpuguard_gpu_healthy", index="0") == 1.0


def test_node_hooks_run_on_unhealthy_and_recovery(tmp_path: Path) -> None:
    record = tmp_path / "hook.jsonl"
    script = tmp_path / "hook.py"
    script.write_text(
        "import json, sys\n"
        f"open({str(record)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    hooks = (
        "[hooks]\n"
        f'on_unhealthy = ["{sys.executable}", "{script}", "drain", "{{hostname}}", "{{gpus}}", "{{reason}}"]\n'
        f'on_recovered = ["{sys.executable}", "{script}", "resume", "{{state}}"]\n'
    )
    with running_daemon(tmp_path, extra_config=hooks) as proc:
        proc.ctl("exclude", "0", "--reason", "fan $(rm -rf /) noise")
        wait_until(record.exists, 5, "the on_unhealthy hook")
        calls = [json.loads(line) for line in record.read_text().splitlines()]
        assert calls[0][0] == "drain" and calls[0][2] == "0"
        assert "fan $(rm -rf /) noise" in calls[0][3]
        proc.ctl("include", "0")
        wait_until(lambda: len(record.read_text().splitlines()) >= 2, 5, "the on_recovered hook")
        calls = [json.loads(line) for line in record.read_text().splitlines()]
        assert calls[-1] == ["resume", "healthy"]
        assert proc.kinds().count("node_hook") >= 2
