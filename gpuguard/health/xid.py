"""NVIDIA's Xid catalog as data, and what each Xid asks gpuguard to do.

Source: NVIDIA's Xid catalog
(https://docs.nvidia.com/deploy/xid-errors/analyzing-xid-catalog.html, sheet
"Catalog"), taken from the copy leptonai/gpud generated on 2025-10-29
(components/accelerator/nvidia/xid/catalog_generated.go, Apache-2.0); the
project's reference notes (shared/reference/SOURCE.md) say how. It ships as `xid_catalog.csv` beside this
module and is read once. NVIDIA's immediate resolution is mapped to
gpuguard's `Action` by the `IMMEDIATE_ACTIONS` table below, so a catalog
update is a data change.
"""

from __future__ import annotations

import csv
import functools
import io
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources

from gpuguard.health.types import Action, Severity

CATALOG_FILE = "xid_catalog.csv"
UNKNOWN_DESCRIPTION = "unknown Xid (not in NVIDIA's catalog)"

# Xid 154 says "read the GPU's recovery-action field"; this immediate action
# marks it.
FOLLOWS_RECOVERY_ACTION = "XID_154"

# NVIDIA's immediate resolution -> gpuguard's action and the severity of a
# finding that asks for it. Every value of the CSV's column must be here.
IMMEDIATE_ACTIONS: Mapping[str, tuple[Action, Severity]] = {
    "RESTART_APP": (Action.RESTART_APP, Severity.ERROR),
    "CHECK_UVM": (Action.RESTART_APP, Severity.ERROR),
    "RESET_GPU": (Action.RESET_GPU, Severity.CRITICAL),
    "WORKFLOW_XID_48": (Action.RESET_GPU, Severity.CRITICAL),
    "WORKFLOW_NVLINK5_ERR": (Action.RESET_GPU, Severity.CRITICAL),
    "WORKFLOW_NVLINK_ERR": (Action.RESET_GPU, Severity.CRITICAL),
    "RESTART_BM": (Action.REBOOT_NODE, Severity.CRITICAL),
    "RESTART_VM": (Action.REBOOT_NODE, Severity.CRITICAL),
    "IGNORE": (Action.NONE, Severity.INFO),
    # 45 is the cleanup after an earlier error; that error carries the action
    "WORKFLOW_XID_45": (Action.NONE, Severity.INFO),
    "CONTACT_SUPPORT": (Action.INSPECT, Severity.CRITICAL),
    "CHECK_MECHANICALS": (Action.INSPECT, Severity.CRITICAL),
    "UPDATE_SWFW": (Action.INSPECT, Severity.CRITICAL),
    # decided per GPU by resolve() from the snapshot's recovery_action
    FOLLOWS_RECOVERY_ACTION: (Action.UNKNOWN, Severity.ERROR),
    "": (Action.UNKNOWN, Severity.ERROR),
}

# NVML_FI_DEV_GET_GPU_RECOVERY_ACTION value -> what it asks for. Draining P2P
# first leaves the GPU usable meanwhile, hence only a warning.
RECOVERY_ACTIONS: Mapping[int, tuple[str, Action, Severity]] = {
    0: ("none", Action.NONE, Severity.INFO),
    1: ("reset the GPU", Action.RESET_GPU, Severity.CRITICAL),
    2: ("reboot the node", Action.REBOOT_NODE, Severity.CRITICAL),
    3: ("drain peer-to-peer traffic, then reset the GPU", Action.RESET_GPU, Severity.WARNING),
    4: ("drain and reset the GPU", Action.RESET_GPU, Severity.CRITICAL),
}
_UNKNOWN_RECOVERY = ("unknown recovery action", Action.UNKNOWN, Severity.ERROR)


@dataclass(frozen=True, slots=True)
class XidInfo:
    """One catalog row with gpuguard's reading of it."""

    code: int
    mnemonic: str
    description: str
    immediate_action: str  # NVIDIA's words, e.g. "RESET_GPU"
    investigatory_action: str
    action: Action
    severity: Severity

    @property
    def follows_recovery_action(self) -> bool:
        return self.immediate_action == FOLLOWS_RECOVERY_ACTION


def parse_catalog(text: str) -> dict[int, XidInfo]:
    """Rows of the catalog CSV by code; an unmapped immediate action is an
    error, so a catalog update cannot slip in an action nobody decided on."""
    catalog: dict[int, XidInfo] = {}
    for row in csv.DictReader(io.StringIO(text)):
        immediate = row["immediate_action"].strip()
        if immediate not in IMMEDIATE_ACTIONS:
            raise ValueError(f"Xid {row['xid']}: immediate action {immediate!r} has no gpuguard action")
        action, severity = IMMEDIATE_ACTIONS[immediate]
        code = int(row["xid"])
        catalog[code] = XidInfo(
            code=code,
            mnemonic=row["mnemonic"].strip(),
            description=row["description"].strip(),
            immediate_action=immediate,
            investigatory_action=row["investigatory_action"].strip(),
            action=action,
            severity=severity,
        )
    return catalog


@functools.cache
def catalog() -> Mapping[int, XidInfo]:
    """The packaged catalog, read on first use."""
    text = resources.files(__package__).joinpath(CATALOG_FILE).read_text(encoding="utf-8")
    return parse_catalog(text)


def lookup(code: int) -> XidInfo:
    """The catalog entry for `code`; a code newer than the catalog is an
    unknown action, never a harmless one."""
    info = catalog().get(code)
    if info is not None:
        return info
    return XidInfo(
        code=code,
        mnemonic="",
        description=UNKNOWN_DESCRIPTION,
        immediate_action="",
        investigatory_action="",
        action=Action.UNKNOWN,
        severity=Severity.ERROR,
    )


def recovery_action(value: int | None) -> tuple[str, Action, Severity]:
    """What a recovery-action field value asks for (None or a value newer
    than this table: unknown)."""
    if value is None:
        return _UNKNOWN_RECOVERY
    return RECOVERY_ACTIONS.get(value, _UNKNOWN_RECOVERY)


def resolve(info: XidInfo, recovery: int | None) -> tuple[Action, Severity]:
    """The action and severity of one Xid on a GPU whose recovery-action
    field reads `recovery`; only Xid 154 depends on it."""
    if info.follows_recovery_action:
        _, action, severity = recovery_action(recovery)
        return action, severity
    return info.action, info.severity


def action_of(code: int, recovery: int | None = None) -> Action:
    """What one Xid asks for on a GPU whose recovery-action field reads `recovery`."""
    return resolve(lookup(code), recovery)[0]
