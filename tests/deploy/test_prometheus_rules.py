"""deploy/prometheus-rules.yml: Prometheus's own tool checks it and runs its unit tests
(tests/deploy/prometheus-rules.test.yml: every alert silent, then firing with its labels and
annotations), and every series a rule selects is one gpuguard exports, with the label values
it exports (the collector of gpuguard/metrics.py over a real simulated daemon's status)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gpuguard.metrics import GpuguardCollector
from harness import REPO, DaemonProc

RULES = REPO / "deploy" / "prometheus-rules.yml"
UNIT_TESTS = Path(__file__).with_name("prometheus-rules.test.yml")
promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus; .ci/run installs it)"
)


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


@promtool
def test_promtool_checks_the_rules() -> None:
    done = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in done.stdout


@promtool
def test_promtool_runs_the_alert_unit_tests() -> None:
    done = subprocess.run(["promtool", "test", "rules", str(UNIT_TESTS)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


def test_every_alert_is_unit_tested_silent_and_firing() -> None:
    unit = yaml.safe_load(UNIT_TESTS.read_text())
    assert [str((UNIT_TESTS.parent / f).resolve()) for f in unit["rule_files"]] == [str(RULES)]
    cases = [case for test in unit["tests"] for case in test["alert_rule_test"]]
    for rule in alerts():
        name = rule["alert"]
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name}: no test where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{name}: no test where it stays silent"
        for case in mine:
            for alert in case["exp_alerts"]:
                assert alert["exp_labels"]["severity"] == rule["labels"]["severity"]
                assert set(alert["exp_annotations"]) == set(rule["annotations"]), name


def test_every_alert_has_a_severity_summary_and_description() -> None:
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names))
    for rule in alerts():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


class StatusOf:
    """What GpuguardCollector reads, from a status the test holds (a plain object, no mock)."""

    def __init__(self, status: dict[str, Any], xids: dict[tuple[str, int], int]) -> None:
        self._status, self._xids = status, xids

    def status(self) -> dict[str, Any]:
        return self._status

    def xid_counts(self) -> dict[tuple[str, int], int]:
        return self._xids


SELECTOR = re.compile(r"\b(gpuguard_[a-z_]+)(?:\{([^}]*)\})?")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')


@pytest.mark.e2e
def test_the_rules_select_series_gpuguard_exports(daemon: DaemonProc) -> None:
    daemon.ctl("inject", "0", "xid", "79")
    status = daemon.status()
    uuid = status["gpus"][0]["uuid"]
    # a managed job as the status reports one (the keys the collector reads)
    status["jobs"] = [{"name": "train", "state": "running", "gpus": [uuid], "restarts": 2, "checkpoint_age_s": 60.0}]
    registry = CollectorRegistry()
    registry.register(GpuguardCollector(StatusOf(status, {(uuid, 79): 1})))
    exported: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            exported.setdefault(sample.name, []).append(sample.labels)
    selected = 0
    for rule in alerts():
        for name, matchers in SELECTOR.findall(rule["expr"]):
            selected += 1
            assert name in exported, f"{rule['alert']}: gpuguard exports no {name}"
            for label, op, value in MATCHER.findall(matchers):
                assert op == "=", f"{rule['alert']}: {label}{op}{value!r} is not checked here"
                seen = {labels.get(label) for labels in exported[name]}
                exported_values = sorted(map(str, seen))
                assert value in seen, f"{rule['alert']}: {name} has no {label}={value!r} (exported: {exported_values})"
        for label in re.findall(r"\$labels\.(\w+)", str(rule["annotations"])):
            series_labels = {k for name, _ in SELECTOR.findall(rule["expr"]) for s in exported[name] for k in s}
            # instance (and job, xid's own) come from the scrape or the series
            assert label in series_labels | {"instance", "job"}, f"{rule['alert']}: no label {label} to show"
    assert selected >= len(alerts()) - 1  # all but GpuguardDown (Prometheus's own `up`)
