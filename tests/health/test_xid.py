"""The packaged Xid catalog and its map to gpuguard's actions."""

from __future__ import annotations

import csv
from importlib import resources

import pytest

from gpuguard.health import xid
from gpuguard.health.types import Action, Severity


def _rows() -> list[dict[str, str]]:
    text = resources.files("gpuguard.health").joinpath(xid.CATALOG_FILE).read_text(encoding="utf-8")
    return list(csv.DictReader(text.splitlines()))


def test_packaged_catalog_has_every_row() -> None:
    rows = _rows()
    assert list(rows[0]) == ["xid", "mnemonic", "description", "immediate_action", "investigatory_action"]
    assert len(xid.catalog()) == len(rows) == 172


def test_every_immediate_action_in_the_csv_is_mapped() -> None:
    values = {row["immediate_action"].strip() for row in _rows()}
    assert values - set(xid.IMMEDIATE_ACTIONS) == set()


def test_unmapped_immediate_action_is_refused() -> None:
    text = "xid,mnemonic,description,immediate_action,investigatory_action\n7,X,Y,PRAY,\n"
    with pytest.raises(ValueError, match="PRAY"):
        xid.parse_catalog(text)


@pytest.mark.parametrize(
    ("code", "action", "severity"),
    [
        (13, Action.RESTART_APP, Severity.ERROR),
        (31, Action.RESTART_APP, Severity.ERROR),
        (94, Action.RESTART_APP, Severity.ERROR),
        (159, Action.RESTART_APP, Severity.ERROR),  # CHECK_UVM
        (48, Action.RESET_GPU, Severity.CRITICAL),  # WORKFLOW_XID_48
        (95, Action.RESET_GPU, Severity.CRITICAL),
        (119, Action.RESET_GPU, Severity.CRITICAL),
        (120, Action.RESET_GPU, Severity.CRITICAL),
        (140, Action.RESET_GPU, Severity.CRITICAL),
        (74, Action.RESET_GPU, Severity.CRITICAL),  # WORKFLOW_NVLINK_ERR
        (144, Action.RESET_GPU, Severity.CRITICAL),  # WORKFLOW_NVLINK5_ERR
        (79, Action.REBOOT_NODE, Severity.CRITICAL),  # RESTART_BM
        (151, Action.REBOOT_NODE, Severity.CRITICAL),  # RESTART_VM
        (63, Action.NONE, Severity.INFO),
        (92, Action.NONE, Severity.INFO),
        (45, Action.NONE, Severity.INFO),  # WORKFLOW_XID_45
        (1, Action.INSPECT, Severity.CRITICAL),  # CONTACT_SUPPORT
        (54, Action.INSPECT, Severity.CRITICAL),  # CHECK_MECHANICALS
        (78, Action.INSPECT, Severity.CRITICAL),  # UPDATE_SWFW
        (162, Action.UNKNOWN, Severity.ERROR),  # empty in the catalog
    ],
)
def test_lookup_maps_catalog_rows(code: int, action: Action, severity: Severity) -> None:
    info = xid.lookup(code)
    assert (info.code, info.action, info.severity) == (code, action, severity)


def test_lookup_reads_the_row() -> None:
    info = xid.lookup(79)
    assert info.mnemonic == "ROBUST_CHANNEL_GPU_HAS_FALLEN_OFF_THE_BUS"
    assert info.description == "GPU has fallen off the bus"
    assert info.immediate_action == "RESTART_BM"
    assert info.investigatory_action == "CONTACT_SUPPORT"


def test_unknown_code_is_unknown_action() -> None:
    info = xid.lookup(999)
    assert info.action == Action.UNKNOWN
    assert info.severity == Severity.ERROR
    assert info.description == "unknown Xid (not in NVIDIA's catalog)"


@pytest.mark.parametrize(
    ("recovery", "action"),
    [
        (0, Action.NONE),
        (1, Action.RESET_GPU),
        (2, Action.REBOOT_NODE),
        (3, Action.RESET_GPU),
        (4, Action.RESET_GPU),
        (None, Action.UNKNOWN),
        (9, Action.UNKNOWN),
    ],
)
def test_xid_154_follows_recovery_action(recovery: int | None, action: Action) -> None:
    info = xid.lookup(154)
    assert info.follows_recovery_action
    assert xid.resolve(info, recovery)[0] == action


def test_other_xids_ignore_recovery_action() -> None:
    assert xid.resolve(xid.lookup(13), 2) == (Action.RESTART_APP, Severity.ERROR)
