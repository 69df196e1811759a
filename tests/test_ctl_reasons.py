"""The operator's sentences for the daemon's reasons (gpuguard/ctl/reasons.py)
and the columns that fit a width (gpuguard/ctl/tables.py), without a daemon."""

from __future__ import annotations

import pytest

from gpuguard.ctl.reasons import explain, phrase
from gpuguard.ctl.tables import elide, plural, table


@pytest.mark.parametrize(
    ("message", "said"),
    [  # the messages as gpuguard/health/checks and gpuguard/daemon/gpus.py write them
        ("GPU is lost: reboot the node (seen in nvmlDeviceGetUtilizationRates)", "the GPU is lost (the driver can no longer reach it)"),
        ("GPU requires a reset: reset the GPU (seen in nvmlDeviceGetMemoryInfo)", "the driver says the GPU needs a reset"),
        ("NVML did not answer in time (seen in poll)", "the driver did not answer in time"),
        ("NVML wedged: no answer within the deadline for 1s: treated as lost until NVML answers and probation passes",
         "the driver has not answered for 1 second"),
        ("no data from NVML for this GPU", "no reading from the driver yet"),
        ("Xid 48 (Double Bit ECC Error): reset the GPU", "Xid 48 (Double Bit ECC Error)"),
        ("Xid 13 (Graphics Engine Exception): restart the application (seen 3 times)",
         "Xid 13 (Graphics Engine Exception), seen 3 times"),
        ("1 uncorrected ECC errors since the last reset: reset the GPU", "1 uncorrected ECC error since the last reset"),
        ("2 uncorrected ECC errors since the last reset: reset the GPU", "2 uncorrected ECC errors since the last reset"),
        ("corrected ECC errors at 120/h (over 100/h): memory is wearing",
         "120 corrected ECC errors an hour (more than 100): the memory is wearing"),
        ("1 retired memory pages (limit 1): hardware inspection needed", "1 retired memory page (limit 1)"),
        ("row remapping pending: reset the GPU", "a row remap is pending"),
        ("temperature 95 C (limit 95 C): hardware inspection needed", "temperature 95 C, at or over the 95 C limit"),
        ("hardware slowdown or power brake held for 1 s: clocks are throttled",
         "clocks throttled (hardware slowdown or power brake) for 1 second"),
        ("reset in progress", "a reset is in progress"),
        ("bad fan, see ticket 42", "bad fan, see ticket 42"),  # an operator's own words stay
    ],
)  # fmt: skip
def test_each_daemon_message_reads_as_a_phrase(message: str, said: str) -> None:
    assert phrase(message) == said


def test_explain_joins_the_findings_and_ends_with_what_to_do() -> None:
    finding = {"severity": "critical", "message": "2 uncorrected ECC errors since the last reset: reset the GPU"}
    gpu = {"state": "faulted", "reason": finding["message"], "action": "reset_gpu",
           "findings": [{"severity": "info", "message": "ignored"}, finding]}  # fmt: skip
    assert explain(gpu) == "2 uncorrected ECC errors since the last reset. Reset the GPU."
    assert explain({"state": "healthy", "reason": None}) is None
    assert explain({"state": "excluded", "reason": "excluded by operator", "action": "none"}) == "Excluded by an operator."
    assert explain({"state": "resetting", "reason": "reset in progress", "action": "reset_gpu"}) == "A reset is in progress."


def test_columns_fit_the_width_by_cutting_the_ones_that_may_shrink() -> None:
    rows = [("0", "x" * 50, "/a/very/long/path/to/the/last/checkpoint.pt")]
    out = table(("ID", "NAME", "PATH"), rows, width=40, shrink=(1, 2))
    assert max(map(len, out.splitlines())) <= 40 and out.splitlines()[1].startswith("0   ")
    assert elide("abcdefghij", 5) in ("ab…ij", "ab~ij") and elide("abc", 5) == "abc"
    assert (plural(1, "restart"), plural(0, "restart")) == ("1 restart", "0 restarts")
