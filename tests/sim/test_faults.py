from __future__ import annotations

import pytest

from gpuguard.sim.backend import SimulatedBackend
from gpuguard.sim.faults import NVML_HANG_DEFAULT_S, Fault, parse_fault


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("xid", "79", Fault("xid", 79)),
        ("XID", " 13 ", Fault("xid", 13)),
        ("ecc-dbe", None, Fault("ecc-dbe")),
        ("ecc-sbe", "5", Fault("ecc-sbe", 5)),
        ("thermal", "92", Fault("thermal", 92)),
        ("nvml-hang", None, Fault("nvml-hang", NVML_HANG_DEFAULT_S)),
        ("nvml-hang", "0.5", Fault("nvml-hang", 0.5)),
        ("clear", "", Fault("clear")),
        ("attach", "1234", Fault("attach", 1234)),
        ("detach", "1", Fault("detach", 1)),
    ],
)
def test_valid_faults_parse(name: str, value: str | None, expected: Fault) -> None:
    assert parse_fault(name, value) == expected


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("melt", None, "unknown fault 'melt'; known faults: xid CODE"),
        ("xid", None, "xid needs CODE, an integer from 1 to 999"),
        ("xid", "abc", "xid CODE must be an integer from 1 to 999 (got 'abc')"),
        ("xid", "0", "xid CODE must be from 1 to 999 (got 0)"),
        ("ecc-sbe", None, "ecc-sbe needs COUNT"),
        ("ecc-sbe", "-3", "ecc-sbe COUNT must be from 1 to 1000000 (got -3)"),
        ("thermal", "hot", "thermal CELSIUS must be an integer"),
        ("thermal", "400", "thermal CELSIUS must be from 0 to 150 (got 400)"),
        ("nvml-hang", "-1", "nvml-hang needs SECONDS between 0 and 3600 (got '-1')"),
        ("nvml-hang", "nan", "nvml-hang needs SECONDS between 0 and 3600"),
        ("lost", "now", "fault 'lost' takes no value (got 'now')"),
        ("attach", None, "attach needs PID"),
        ("attach", "0", "attach PID must be from 1 to 4194304 (got 0)"),
    ],
)
def test_bad_faults_are_refused_with_a_clear_message(name: str, value: str | None, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_fault(name, value)
    assert message in str(err.value)


def test_inject_refuses_a_bad_index_before_changing_anything(backend: SimulatedBackend, kmsg) -> None:
    for index in (-1, 2):
        with pytest.raises(ValueError, match=rf"no simulated GPU {index}: the indices are 0 to 1"):
            backend.inject(index, "xid", "79")
    assert not kmsg.exists()
    assert all(not s.findings for s in backend.poll())


def test_inject_refuses_a_bad_value_before_changing_anything(backend: SimulatedBackend, kmsg) -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        backend.inject(0, "explode")
    with pytest.raises(ValueError, match="xid CODE"):
        backend.inject(0, "xid", "seventy-nine")
    assert not kmsg.exists()
