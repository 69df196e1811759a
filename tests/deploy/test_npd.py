"""deploy/npd-gpuguard.json: checked against node-problem-detector's custom plugin monitor
config as NPD itself reads it, then run as NPD runs it, against a real simulated daemon.

The schema is NPD's own, from kubernetes/node-problem-detector at commit
6632ca67148f7a23df9cdbd98d9e89b388561a3a:

- pkg/custompluginmonitor/types/config.go: `CustomPluginConfig` and `pluginGlobalConfig` (the
  JSON names and types), `ApplyConfiguration` (the defaults: timeout 5s, invoke_interval 30s,
  max_output_length 80, concurrency 3, message-change updates off, metricsReporting on) and
  `Validate` (plugin "custom", interval > 0, a rule's timeout not above the global one, the
  rule's path exists, a permanent rule's condition has a default condition);
- pkg/custompluginmonitor/types/types.go: `CustomRule` and the plugin statuses OK 0, NonOK 1,
  Unknown 2;
- pkg/types/types.go: `Condition` (type, status, transition, reason, message) and the problem
  types "temporary" and "permanent";
- pkg/custompluginmonitor/plugin/plugin.go `run`: the rule's timeout when below the global
  one, else the global one; stdout only (stderr is logged), at most 4096 bytes read,
  `strings.TrimSpace`, then cut to max_output_length bytes; exit 0 OK, 1 NonOK, anything else
  Unknown;
- pkg/custompluginmonitor/custom_plugin_monitor.go `toConditionStatus`: OK False, NonOK True,
  Unknown Unknown.

Go's encoding/json drops unknown keys without a word (and matches names case-insensitively),
so a misspelt key would silently become its default: the checks below demand NPD's exact names.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import BIN, REPO, DaemonProc, wait_until

CONFIG = REPO / "deploy" / "npd-gpuguard.json"
DAEMONSET = REPO / "deploy" / "daemonset.yaml"

TOP_KEYS = {
    "plugin": str, "pluginConfig": dict, "source": str, "conditions": list, "rules": list, "metricsReporting": bool,
}  # fmt: skip
GLOBAL_KEYS = {
    "invoke_interval": str,
    "timeout": str,
    "max_output_length": int,
    "concurrency": int,
    "enable_message_change_based_condition_update": bool,
    "skip_initial_status": bool,
}
GLOBAL_DEFAULTS = {
    "invoke_interval": "30s",
    "timeout": "5s",
    "max_output_length": 80,
    "concurrency": 3,
    "enable_message_change_based_condition_update": False,
    "skip_initial_status": False,
}
CONDITION_KEYS = {"type": str, "status": str, "transition": str, "reason": str, "message": str}
RULE_KEYS = {
    "type": str, "condition": str, "reason": str, "path": str, "args": list, "timeout": str, "invoke_interval": str,
}  # fmt: skip
RULE_TYPES = {"temporary", "permanent"}
MAX_PLUGIN_STDOUT = 4096  # plugin.go maxCustomPluginBufferBytes
CONDITION_STATUS = {0: "False", 1: "True"}  # everything else: "Unknown"

# the installer's symlink (docs/DEPLOY.md), where NPD on the host or in its image finds gpuguardctl
INSTALLED_CTL = "/usr/local/bin/gpuguardctl"

_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h)")


def go_duration(text: str) -> float:
    """Seconds of a Go time.ParseDuration string ("30s", "1m30s", "1.5h"); ValueError otherwise."""
    sign, rest = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.removeprefix("+"))
    if rest == "0":
        return 0.0
    total, pos = 0.0, 0
    while pos < len(rest):
        match = _GO_PART.match(rest, pos)
        if not match or match.group(1) in ("", "."):
            raise ValueError(f"time: invalid duration {text!r}")
        total += float(match.group(1)) * _GO_UNITS[match.group(2)]
        pos = match.end()
    if not rest:
        raise ValueError(f"time: invalid duration {text!r}")
    return sign * total


def test_go_duration_parses_like_go() -> None:
    assert go_duration("30s") == 30 and go_duration("1m30s") == 90 and go_duration("1.5h") == 5400
    assert go_duration("500ms") == 0.5 and go_duration("0") == 0
    for bad in ("30", "", "s", "1d", "10 s"):
        with pytest.raises(ValueError):
            go_duration(bad)


def typed(where: str, obj: dict[str, Any], schema: dict[str, type]) -> None:
    unknown = set(obj) - set(schema)
    assert not unknown, f"{where}: keys NPD does not know (Go's json drops them silently): {sorted(unknown)}"
    for key, value in obj.items():
        want = schema[key]
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        assert ok, f"{where}.{key}: {value!r} is not a {want.__name__}"


@dataclass
class Effective:
    """The config after NPD's ApplyConfiguration."""

    raw: dict[str, Any]
    invoke_interval_s: float
    timeout_s: float
    max_output_length: int
    concurrency: int
    message_change_updates: bool

    def rule_timeout_s(self, rule: dict[str, Any]) -> float:
        """plugin.go run(): the rule's timeout when it is below the global one."""
        if "timeout" in rule and go_duration(rule["timeout"]) < self.timeout_s:
            return go_duration(rule["timeout"])
        return self.timeout_s


def load_and_validate(path: Path) -> Effective:
    """NPD's NewCustomPluginMonitorOrDie: unmarshal, ApplyConfiguration, Validate (the rule
    path's existence aside: that is checked against the installer below)."""
    raw = json.loads(path.read_text())
    assert isinstance(raw, dict)
    typed("config", raw, TOP_KEYS)
    for key in ("source", "conditions", "rules"):  # not omitempty in CustomPluginConfig
        assert key in raw, f"config: no {key}"
    assert raw.get("plugin") == "custom", 'NPD supports only "plugin": "custom"'
    assert raw["source"], "source names the problems' origin in events and metrics"
    glob = raw.get("pluginConfig", {})
    typed("pluginConfig", glob, GLOBAL_KEYS)
    settings = {**GLOBAL_DEFAULTS, **glob}
    effective = Effective(
        raw=raw,
        invoke_interval_s=go_duration(settings["invoke_interval"]),
        timeout_s=go_duration(settings["timeout"]),
        max_output_length=settings["max_output_length"],
        concurrency=settings["concurrency"],
        message_change_updates=settings["enable_message_change_based_condition_update"],
    )
    assert effective.invoke_interval_s > 0, "global invoke interval must be greater than zero"
    assert effective.max_output_length > 0 and effective.concurrency > 0
    for i, cond in enumerate(raw["conditions"]):
        typed(f"conditions[{i}]", cond, CONDITION_KEYS)
        assert cond.get("type") and cond.get("reason") and cond.get("message"), cond
    default_conditions = {c["type"] for c in raw["conditions"]}
    assert raw["rules"], "a monitor without rules does nothing"
    for i, rule in enumerate(raw["rules"]):
        typed(f"rules[{i}]", rule, RULE_KEYS)
        assert rule.get("type") in RULE_TYPES, rule
        assert rule.get("reason") and rule.get("path"), rule
        assert all(isinstance(a, str) for a in rule.get("args", [])), rule
        if "invoke_interval" in rule:
            assert go_duration(rule["invoke_interval"]) > 0, "rule invoke interval must be greater than zero"
        if "timeout" in rule:
            assert go_duration(rule["timeout"]) <= effective.timeout_s, "plugin timeout is greater than global timeout"
        if rule["type"] == "permanent":
            problem = f"permanent problem {rule['condition']} does not have preset default condition"
            assert rule["condition"] in default_conditions, problem
    return effective


@pytest.fixture(scope="module")
def npd() -> Effective:
    return load_and_validate(CONFIG)


def test_the_config_is_a_valid_custom_plugin_monitor(npd: Effective) -> None:
    # what docs/DEPLOY.md promises: every 30 s, the condition GPUUnhealthy
    assert npd.invoke_interval_s == 30
    (rule,) = npd.raw["rules"]
    assert rule["type"] == "permanent" and rule["condition"] == "GPUUnhealthy"
    (cond,) = npd.raw["conditions"]
    assert cond["type"] == "GPUUnhealthy"
    # NPD kills a plugin at its timeout; gpuguardctl check must get to say "unknown" first
    assert npd.rule_timeout_s(rule) < npd.invoke_interval_s
    assert npd.max_output_length <= MAX_PLUGIN_STDOUT  # NPD never reads more than that


@pytest.mark.parametrize(
    "broken",
    [
        {"plugin": "kmsg"},
        {"pluginConfig": {"invoke_interval": "30"}},
        {"pluginConfig": {"invokeInterval": "30s"}},
        {"pluginConfig": {"invoke_interval": "0s"}},
        {"rules": [{"type": "permanent", "condition": "Nope", "reason": "R", "path": "/bin/true", "args": []}]},
        {"rules": [{"type": "permanent", "condition": "GPUUnhealthy", "reason": "R", "path": "/x", "timeout": "1m"}]},
        {"rules": [{"type": "perm", "condition": "GPUUnhealthy", "reason": "R", "path": "/bin/true"}]},
    ],
)
def test_the_validation_catches_what_npd_would_reject_or_ignore(tmp_path: Path, broken: dict[str, Any]) -> None:
    """The checks above are not vacuous: each of these NPD refuses at start or ignores."""
    config = json.loads(CONFIG.read_text())
    for key, value in broken.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    path = tmp_path / "npd.json"
    path.write_text(json.dumps(config))
    with pytest.raises((AssertionError, ValueError)):
        load_and_validate(path)


def configmap_socket() -> str:
    docs = [d for d in yaml.safe_load_all(DAEMONSET.read_text()) if d]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    match = re.search(r'^socket = "([^"]+)"', cm["data"]["config.toml"], re.M)
    assert match, "the DaemonSet's config names its socket"
    return match.group(1)


def test_the_rule_runs_the_installed_gpuguardctl_check_on_the_daemonsets_socket(npd: Effective) -> None:
    (rule,) = npd.raw["rules"]
    assert rule["path"] == INSTALLED_CTL
    assert rule["args"][0] == "check"
    sock = rule["args"][rule["args"].index("--socket") + 1]
    assert sock == configmap_socket() == "/run/gpuguard/gpuguard.sock"  # also the config's default
    install = (REPO / "deploy" / "install.sh").read_text()
    assert 'ln -sfn "$VENV/bin/$cmd" "$D/usr/local/bin/$cmd"' in install  # the installer makes that path


@dataclass
class Outcome:
    exit_code: int
    message: str  # as NPD keeps it
    condition: str  # the node condition's status NPD sets


def run_like_npd(npd: Effective, rule: dict[str, Any], socket: Path) -> Outcome:
    """plugin.go run(), with the installed gpuguardctl and the DaemonSet's socket mapped to
    this test's: stdout only, trimmed, cut to max_output_length bytes."""
    path = str(BIN / "gpuguardctl") if rule["path"] == INSTALLED_CTL else rule["path"]
    args = [str(socket) if a == configmap_socket() else a for a in rule.get("args", [])]
    done = subprocess.run(
        [path, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        timeout=npd.rule_timeout_s(rule), env={"LANG": "C.UTF-8"},
    )  # fmt: skip
    out = done.stdout[:MAX_PLUGIN_STDOUT].decode().strip().encode()
    assert len(out) <= npd.max_output_length, f"NPD would cut the message ({len(out)} bytes): {out!r}"
    return Outcome(done.returncode, out.decode(), CONDITION_STATUS.get(done.returncode, "Unknown"))


@pytest.mark.e2e
def test_healthy_faulted_and_back(npd: Effective, daemon: DaemonProc) -> None:
    (rule,) = npd.raw["rules"]
    healthy = run_like_npd(npd, rule, daemon.socket)
    assert (healthy.exit_code, healthy.condition) == (0, "False")
    assert healthy.message == "gpuguard: all 2 GPU(s) healthy"

    uuid = daemon.gpu(0)["uuid"]
    daemon.ctl("inject", "0", "xid", "79")
    faulted = wait_until(
        lambda: (o := run_like_npd(npd, rule, daemon.socket)).exit_code == 1 and o, 10, "check to report the fault"
    )
    assert faulted.condition == "True"
    assert faulted.message.startswith(f"gpuguard: GPU 0 ({uuid}) faulted") and "Xid 79" in faulted.message

    daemon.ctl("exclude", "1", "--reason", "bad fan")
    both = wait_until(
        lambda: "GPU 1" in (o := run_like_npd(npd, rule, daemon.socket)).message and o, 10, "check to name GPU 1"
    )
    assert both.condition == "True" and "GPU 0" in both.message  # two GPUs still fit in max_output_length

    daemon.ctl("include", "1")
    daemon.ctl("inject", "0", "clear")
    daemon.ctl("include", "0")
    back = wait_until(lambda: (o := run_like_npd(npd, rule, daemon.socket)).exit_code == 0 and o, 10, "healthy again")
    assert back.condition == "False"


def test_an_unreachable_daemon_is_unknown(npd: Effective, tmp_path: Path) -> None:
    (rule,) = npd.raw["rules"]
    socket = tmp_path / "gone.sock"
    outcome = run_like_npd(npd, rule, socket)
    assert (outcome.exit_code, outcome.condition) == (2, "Unknown")
    assert str(socket) in outcome.message  # NPD shows the message with an Unknown condition
