"""evaluate(): one GPU's verdict from snapshots, Xids and thresholds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pytest

from gpuguard.config import HealthConfig
from gpuguard.health.rules import combine, evaluate
from gpuguard.health.types import Action, Finding, GpuState, Severity, Verdict
from gpuguard.nvml.types import FindingKind, GpuSnapshot, NvmlFinding
from gpuguard.observations import XidObservation

UUID = "GPU-00000000-1111-2222-3333-444444444444"
NOW = 10_000.0
CONFIG = HealthConfig()


def snap(t: float = NOW, **fields: object) -> GpuSnapshot:
    """A healthy-looking snapshot at time t, with `fields` overridden."""
    base = GpuSnapshot(index=0, uuid=UUID, timestamp=t, temperature_c=50, ecc_volatile_uncorrected=0)
    return replace(base, **fields)


def xid(code: int, age_s: float = 1.0, *, historical: bool = False) -> XidObservation:
    return XidObservation(xid=code, timestamp=NOW - age_s, source="kmsg", historical=historical)


def verdict(
    snapshot: GpuSnapshot | None = None,
    *,
    history: Sequence[GpuSnapshot] = (),
    xids: Sequence[XidObservation] = (),
    config: HealthConfig = CONFIG,
    now: float = NOW,
    no_snapshot: bool = False,
) -> Verdict:
    current = None if no_snapshot else (snapshot or snap())
    return evaluate(UUID, current, history=history, xids=xids, config=config, now=now)


def kinds(v: Verdict) -> list[str]:
    return [f.kind for f in v.findings]


# --- baseline and missing data -------------------------------------------


def test_clean_snapshot_is_healthy() -> None:
    v = verdict()
    assert (v.uuid, v.state, v.action, v.reason, v.findings) == (UUID, GpuState.HEALTHY, Action.NONE, None, ())


def test_no_snapshot_is_unknown_never_healthy() -> None:
    v = verdict(no_snapshot=True)
    assert v.state == GpuState.UNKNOWN
    assert v.reason is not None and "no data" in v.reason


def test_no_snapshot_still_reads_live_xids() -> None:
    v = verdict(no_snapshot=True, xids=[xid(79)])
    assert (v.state, v.action) == (GpuState.FAULTED, Action.REBOOT_NODE)


# --- NVML findings --------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "state", "action", "event_kind", "severity"),
    [
        (FindingKind.GPU_LOST, GpuState.FAULTED, Action.REBOOT_NODE, "gpu_lost", Severity.CRITICAL),
        (FindingKind.RESET_REQUIRED, GpuState.FAULTED, Action.RESET_GPU, "gpu_reset_required", Severity.CRITICAL),
        (FindingKind.DEADLINE, GpuState.UNKNOWN, Action.NONE, "nvml_timeout", Severity.ERROR),
        (FindingKind.NVML_ERROR, GpuState.UNKNOWN, Action.NONE, "nvml_error", Severity.ERROR),
    ],
)
def test_nvml_findings(
    kind: FindingKind, state: GpuState, action: Action, event_kind: str, severity: Severity
) -> None:
    v = verdict(snap(findings=(NvmlFinding(kind, "nvmlDeviceGetTemperature"),)))
    assert (v.state, v.action) == (state, action)
    [finding] = v.findings
    assert (finding.kind, finding.severity, finding.action) == (event_kind, severity, action)
    assert "nvmlDeviceGetTemperature" in finding.message


def test_nvml_findings_of_one_kind_make_one_finding() -> None:
    findings = (NvmlFinding(FindingKind.DEADLINE, "b"), NvmlFinding(FindingKind.DEADLINE, "a"))
    v = verdict(snap(findings=findings))
    assert kinds(v) == ["nvml_timeout"]
    assert v.findings[0].message.endswith("(seen in a, b)")


# --- Xids -----------------------------------------------------------------


@pytest.mark.parametrize("code", [13, 31, 94])
def test_restart_app_xid_keeps_gpu_healthy_but_asks_for_restart(code: int) -> None:
    v = verdict(xids=[xid(code)])
    assert (v.state, v.action) == (GpuState.HEALTHY, Action.RESTART_APP)
    [finding] = v.findings
    assert (finding.kind, finding.xid, finding.severity) == ("xid", code, Severity.ERROR)
    assert v.reason == finding.message


def test_restart_app_xid_expires_after_its_window() -> None:
    window = CONFIG.restart_app_window_s
    assert verdict(xids=[xid(13, age_s=window)]).action == Action.RESTART_APP
    expired = verdict(xids=[xid(13, age_s=window + 1)])
    assert (expired.state, expired.action, expired.findings) == (GpuState.HEALTHY, Action.NONE, ())


@pytest.mark.parametrize("code", [48, 95, 119, 120, 140])
def test_reset_class_xid_faults_the_gpu(code: int) -> None:
    v = verdict(xids=[xid(code, age_s=3600)])  # no window: the caller clears it after a reset
    assert (v.state, v.action) == (GpuState.FAULTED, Action.RESET_GPU)
    assert v.findings[0].severity == Severity.CRITICAL


def test_reboot_class_xid_message() -> None:
    v = verdict(xids=[xid(79)])
    assert (v.state, v.action) == (GpuState.FAULTED, Action.REBOOT_NODE)
    assert v.reason == "Xid 79 (GPU has fallen off the bus): reboot the node"


def test_inspect_class_xid_faults_the_gpu() -> None:
    v = verdict(xids=[xid(54)])  # auxiliary power not connected
    assert (v.state, v.action) == (GpuState.FAULTED, Action.INSPECT)


@pytest.mark.parametrize("code", [63, 92])
def test_ignore_class_xid_is_info_only(code: int) -> None:
    v = verdict(xids=[xid(code)])
    assert (v.state, v.action, v.reason) == (GpuState.HEALTHY, Action.NONE, None)
    [finding] = v.findings
    assert (finding.kind, finding.xid, finding.severity) == ("xid", code, Severity.INFO)


@pytest.mark.parametrize("code", [999, 162])  # not in the catalog; in it with no action
def test_unknown_xid_degrades(code: int) -> None:
    v = verdict(xids=[xid(code)])
    assert (v.state, v.action) == (GpuState.DEGRADED, Action.UNKNOWN)
    assert v.findings[0].xid == code


@pytest.mark.parametrize(
    ("recovery", "state", "action"),
    [
        (0, GpuState.HEALTHY, Action.NONE),
        (1, GpuState.FAULTED, Action.RESET_GPU),
        (2, GpuState.FAULTED, Action.REBOOT_NODE),
        (3, GpuState.DEGRADED, Action.RESET_GPU),
        (4, GpuState.FAULTED, Action.RESET_GPU),
        (None, GpuState.DEGRADED, Action.UNKNOWN),
    ],
)
def test_xid_154_follows_recovery_action(recovery: int | None, state: GpuState, action: Action) -> None:
    v = verdict(snap(recovery_action=recovery), xids=[xid(154)])
    assert (v.state, v.action) == (state, action)
    xid_finding = next(f for f in v.findings if f.kind == "xid")
    assert xid_finding.action == action
    assert f"recovery action {recovery}" in xid_finding.message


def test_repeated_xid_is_one_finding() -> None:
    v = verdict(xids=[xid(119, 5), xid(119, 2), xid(13)])
    assert [f.xid for f in v.findings] == [13, 119]
    assert v.findings[1].message.endswith("(seen 2 times)")


def test_historical_xid_ignored_without_a_current_fault() -> None:
    v = verdict(xids=[xid(79, historical=True), xid(999, historical=True)])
    assert (v.state, v.findings) == (GpuState.HEALTHY, ())


@pytest.mark.parametrize(
    "fault",
    [
        {"findings": (NvmlFinding(FindingKind.GPU_LOST, "poll"),)},
        {"findings": (NvmlFinding(FindingKind.RESET_REQUIRED, "poll"),)},
        {"remap_pending": True},
        {"retired_pages_pending": True},
        {"recovery_action": 1},
        {"recovery_action": 2},
        {"recovery_action": 4},
        {"ecc_volatile_uncorrected": 2},
    ],
)
def test_historical_xid_acts_while_the_gpu_shows_a_fault(fault: dict[str, object]) -> None:
    v = verdict(snap(**fault), xids=[xid(119, age_s=5000, historical=True)])
    assert [f.xid for f in v.findings if f.kind == "xid"] == [119]


def test_historical_xid_ignored_for_drain_only_recovery_action() -> None:
    v = verdict(snap(recovery_action=3), xids=[xid(119, historical=True)])
    assert "xid" not in kinds(v)


# --- ECC and retired pages ----------------------------------------------


def test_uncorrected_ecc_faults() -> None:
    v = verdict(snap(ecc_volatile_uncorrected=1))
    assert (v.state, v.action) == (GpuState.FAULTED, Action.RESET_GPU)
    assert (v.findings[0].kind, v.findings[0].severity) == ("ecc", Severity.CRITICAL)


def _ecc_series(counts: Sequence[int], step_s: float) -> tuple[list[GpuSnapshot], GpuSnapshot]:
    points = [snap(NOW - step_s * (len(counts) - 1 - i), ecc_volatile_corrected=c) for i, c in enumerate(counts)]
    return points[:-1], points[-1]


def test_corrected_ecc_rate_above_threshold_degrades() -> None:
    history, current = _ecc_series([0, 10, 20], step_s=150.0)  # 20 in 300 s = 240/h
    v = verdict(current, history=history)
    assert (v.state, v.action) == (GpuState.DEGRADED, Action.NONE)
    assert (v.findings[0].kind, v.findings[0].severity) == ("ecc", Severity.WARNING)
    assert "240/h" in v.findings[0].message


def test_corrected_ecc_rate_below_threshold_is_healthy() -> None:
    history, current = _ecc_series([0, 4, 8], step_s=300.0)  # 8 in 600 s = 48/h
    assert verdict(current, history=history).state == GpuState.HEALTHY


def test_corrected_ecc_rate_needs_a_minute_of_history() -> None:
    history, current = _ecc_series([0, 50, 100], step_s=20.0)  # 100 in 40 s: too short to judge
    assert verdict(current, history=history).state == GpuState.HEALTHY
    assert verdict(current).state == GpuState.HEALTHY


def test_corrected_ecc_rate_restarts_after_counter_reset() -> None:
    # the counter went 5000 -> 0 at a reset 30 s ago: only 30 s of data since
    history, current = _ecc_series([4000, 5000, 0, 10], step_s=30.0)
    assert verdict(current, history=history).state == GpuState.HEALTHY


def test_retired_pages_at_limit_degrade_for_inspection() -> None:
    v = verdict(snap(retired_pages_sbe=40, retired_pages_dbe=8))
    assert (v.state, v.action) == (GpuState.DEGRADED, Action.INSPECT)
    assert verdict(snap(retired_pages_sbe=40, retired_pages_dbe=7)).state == GpuState.HEALTHY


def test_retired_pages_pending_asks_for_reset() -> None:
    v = verdict(snap(retired_pages_pending=True))
    assert (v.state, v.action, kinds(v)) == (GpuState.DEGRADED, Action.RESET_GPU, ["ecc"])


# --- row remapping ------------------------------------------------------


def test_remap_pending_degrades_and_asks_for_reset() -> None:
    v = verdict(snap(remap_pending=True))
    assert (v.state, v.action) == (GpuState.DEGRADED, Action.RESET_GPU)
    assert (v.findings[0].kind, v.findings[0].severity) == ("remap", Severity.WARNING)


def test_remap_failure_faults() -> None:
    v = verdict(snap(remap_failure=True))
    assert (v.state, v.action) == (GpuState.FAULTED, Action.INSPECT)
    assert (v.findings[0].kind, v.findings[0].severity) == ("remap", Severity.CRITICAL)


# --- thermal ------------------------------------------------------------


def test_temperature_thresholds() -> None:
    assert verdict(snap(temperature_c=CONFIG.temperature_degraded_c - 1)).state == GpuState.HEALTHY
    warm = verdict(snap(temperature_c=CONFIG.temperature_degraded_c))
    assert (warm.state, warm.action, kinds(warm)) == (GpuState.DEGRADED, Action.NONE, ["thermal"])
    hot = verdict(snap(temperature_c=CONFIG.temperature_faulted_c))
    assert (hot.state, hot.action, kinds(hot)) == (GpuState.FAULTED, Action.INSPECT, ["thermal"])
    assert hot.findings[0].severity == Severity.CRITICAL


def _slowdown_history(flags: Sequence[bool], step_s: float = 10.0) -> list[GpuSnapshot]:
    n = len(flags)
    return [snap(NOW - step_s * (n - i), hw_slowdown=f) for i, f in enumerate(flags)]


def test_sustained_hw_slowdown_degrades() -> None:
    history = _slowdown_history([False] + [True] * 6)  # slowed since NOW - 60
    v = verdict(snap(hw_slowdown=True), history=history)
    assert (v.state, kinds(v)) == (GpuState.DEGRADED, ["thermal"])
    assert v.findings[0].severity == Severity.WARNING


def test_power_brake_counts_as_slowdown() -> None:
    history = [snap(NOW - 10 * i, power_brake=True) for i in range(8, 0, -1)]
    assert verdict(snap(power_brake=True), history=history).state == GpuState.DEGRADED


def test_hw_slowdown_blip_is_ignored() -> None:
    history = _slowdown_history([True] * 3 + [False] + [True] * 3)  # broken 40 s ago
    assert verdict(snap(hw_slowdown=True), history=history).state == GpuState.HEALTHY
    assert verdict(snap(hw_slowdown=False), history=_slowdown_history([True] * 8)).state == GpuState.HEALTHY


def test_hw_slowdown_needs_history_reaching_back() -> None:
    history = _slowdown_history([True] * 5)  # 50 s of history only
    assert verdict(snap(hw_slowdown=True), history=history).state == GpuState.HEALTHY


# --- recovery-action field ----------------------------------------------


@pytest.mark.parametrize(
    ("value", "state", "action"),
    [
        (1, GpuState.FAULTED, Action.RESET_GPU),
        (2, GpuState.FAULTED, Action.REBOOT_NODE),
        (3, GpuState.DEGRADED, Action.RESET_GPU),
        (4, GpuState.FAULTED, Action.RESET_GPU),
        (7, GpuState.DEGRADED, Action.UNKNOWN),
    ],
)
def test_recovery_action_field(value: int, state: GpuState, action: Action) -> None:
    v = verdict(snap(recovery_action=value))
    assert (v.state, v.action, kinds(v)) == (state, action, ["recovery_action"])


@pytest.mark.parametrize("value", [0, None])
def test_recovery_action_none_is_healthy(value: int | None) -> None:
    assert verdict(snap(recovery_action=value)).findings == ()


# --- combining ----------------------------------------------------------


def test_faulted_outranks_unknown_and_degraded() -> None:
    findings = (NvmlFinding(FindingKind.DEADLINE, "poll"),)
    v = verdict(snap(findings=findings, remap_pending=True, remap_failure=True, temperature_c=90))
    assert v.state == GpuState.FAULTED
    assert v.action == Action.INSPECT
    assert v.reason == "row remapping failed: hardware inspection needed"
    assert kinds(v) == ["nvml_timeout", "remap", "remap", "thermal"]


def test_unknown_outranks_degraded() -> None:
    findings = (NvmlFinding(FindingKind.NVML_ERROR, "poll"),)
    v = verdict(snap(findings=findings, temperature_c=90))
    assert v.state == GpuState.UNKNOWN
    assert v.reason is not None and v.reason.startswith("NVML returned an unexpected error")


def test_action_is_strongest_even_from_a_milder_state() -> None:
    # DEGRADED asks for inspection, FAULTED for a reset: state FAULTED, action INSPECT
    v = verdict(snap(retired_pages_sbe=100), xids=[xid(119)])
    assert (v.state, v.action) == (GpuState.FAULTED, Action.INSPECT)
    assert v.reason is not None and v.reason.startswith("Xid 119")


def test_reason_prefers_severity_then_action_within_a_state() -> None:
    info = Finding("xid", Severity.INFO, Action.NONE, "info")
    warn = Finding("thermal", Severity.WARNING, Action.NONE, "warm")
    reset = Finding("remap", Severity.WARNING, Action.RESET_GPU, "pending")
    v = combine(UUID, [(GpuState.HEALTHY, info), (GpuState.DEGRADED, warn), (GpuState.DEGRADED, reset)])
    assert (v.state, v.action, v.reason) == (GpuState.DEGRADED, Action.RESET_GPU, "pending")
    assert v.findings == (info, warn, reset)


def test_reason_is_none_when_only_info() -> None:
    v = verdict(xids=[xid(63), xid(92)])
    assert (v.state, v.reason, len(v.findings)) == (GpuState.HEALTHY, None, 2)


def test_findings_in_stable_order() -> None:
    fault = snap(ecc_volatile_uncorrected=3, remap_pending=True, temperature_c=99, recovery_action=1)
    xids = [xid(119), xid(48), xid(13)]
    first = verdict(fault, xids=xids)
    again = verdict(fault, xids=list(reversed(xids)))
    assert first == again
    assert kinds(first) == ["xid", "xid", "xid", "ecc", "remap", "thermal", "recovery_action"]
    assert [f.xid for f in first.findings[:3]] == [13, 48, 119]
