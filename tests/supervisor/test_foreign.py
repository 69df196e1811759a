"""Whether a process gpuguard did not start may get the checkpoint signal
(gpuguard/supervisor/foreign.py): the /proc status parsing on sample text,
then `judge` on processes this test starts itself (and kills)."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from harness import wait_until
from gpuguard.config import JobsConfig
from gpuguard.supervisor.foreign import UNKNOWN, decide, in_mask, judge, listed, send, signal_mask

USR1 = signal.SIGUSR1
NEVER = frozenset(JobsConfig().foreign_never_signal)

# /proc/PID/status of a python3 that installed a SIGUSR1 handler (SIGINT is Python's own)
STATUS_HANDLER = """\
Name:\tpython3
Umask:\t0022
State:\tS (sleeping)
Tgid:\t4242
Pid:\t4242
PPid:\t1
SigQ:\t0/63325
SigPnd:\t0000000000000000
ShdPnd:\t0000000000000000
SigBlk:\t0000000000000000
SigIgn:\t0000000001001000
SigCgt:\t0000000180000202
CapInh:\t0000000000000000
"""
# the same without the handler: SIGUSR1 (bit 9, 0x200) keeps its default action
STATUS_NO_HANDLER = STATUS_HANDLER.replace("SigCgt:\t0000000180000202", "SigCgt:\t0000000180000002")
# one that ignores SIGUSR1
STATUS_IGNORES = STATUS_NO_HANDLER.replace("SigIgn:\t0000000001001000", "SigIgn:\t0000000001001200")


def test_signal_mask_reads_the_hex_fields() -> None:
    assert signal_mask(STATUS_HANDLER) == 0x180000202
    assert signal_mask(STATUS_HANDLER, "SigIgn") == 0x1001000
    assert signal_mask(STATUS_HANDLER, "SigBlk") == 0
    assert signal_mask("Name:\tx\n") is None
    assert signal_mask("SigCgt:\tnot-hex\n") is None
    assert signal_mask("") is None


def test_bit_signum_minus_one_is_the_signal() -> None:
    mask = signal_mask(STATUS_HANDLER)
    assert mask is not None
    assert in_mask(mask, signal.SIGINT) and in_mask(mask, USR1)
    assert not in_mask(mask, signal.SIGUSR2) and not in_mask(mask, signal.SIGTERM)
    assert in_mask(1 << 63, 64) and not in_mask(1, 0)


def test_decide_signals_only_a_process_that_handles_the_signal() -> None:
    assert decide(STATUS_HANDLER, ["python3"], USR1, NEVER).send
    no = decide(STATUS_NO_HANDLER, ["python3"], USR1, NEVER)
    assert not no.send and no.name == "python3"
    assert no.reason == "it does not handle SIGUSR1, which would kill it"
    ignores = decide(STATUS_IGNORES, ["python3"], USR1, NEVER)
    assert not ignores.send and ignores.reason == "it ignores SIGUSR1, so the signal would do nothing"
    assert decide(STATUS_HANDLER, ["python3"], signal.SIGUSR2, NEVER).reason == (
        "it does not handle SIGUSR2, which would kill it"
    )


def test_decide_without_a_readable_status_does_not_signal() -> None:
    unread = decide(None, ["python3"], USR1, NEVER, "Permission denied")
    assert not unread.send
    assert unread.reason == "its /proc status could not be read (Permission denied), so it is not known to handle SIGUSR1"
    no_field = decide("Name:\tpython3\n", [], USR1, NEVER)
    assert not no_field.send and no_field.name == UNKNOWN and "no SigCgt line" in no_field.reason


def test_a_listed_name_is_never_signalled_even_when_it_handles_the_signal() -> None:
    for names in (["nv-hostengine"], ["python3", "dcgm-exporter"], ["nvidia-persiste"]):  # the last: a truncated comm
        verdict = decide(STATUS_HANDLER, names, USR1, NEVER)
        assert not verdict.send and verdict.name == names[0]
        assert verdict.reason.endswith("is on [jobs] foreign_never_signal")
    assert listed(["nvidia-persiste"], NEVER) == "nvidia-persistenced"
    assert listed(["nvidia-persist"], NEVER) is None  # 14 characters is a whole name, not a truncated one
    assert listed(["python3", ""], NEVER) is None
    assert decide(STATUS_HANDLER, ["nv-hostengine"], USR1, frozenset()).send  # an emptied list: only SigCgt decides


# ---------------------------------------------------------------- real processes, all started here

HANDLER = "import signal, sys, time; signal.signal(signal.SIGUSR1, lambda *a: None); print('ready', flush=True); time.sleep(60)"
PLAIN = "import sys, time; print('ready', flush=True); time.sleep(60)"


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def start(procs: list[subprocess.Popen[str]], code: str, argv0: str | None = None) -> subprocess.Popen[str]:
    proc = subprocess.Popen([argv0 or sys.executable, "-c", code], executable=sys.executable, stdout=subprocess.PIPE, text=True)
    procs.append(proc)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def test_judge_reads_proc_for_a_live_process(started: list[subprocess.Popen[str]]) -> None:
    handler, plain = start(started, HANDLER), start(started, PLAIN)
    verdict, create_time = judge(handler.pid, USR1, NEVER)
    assert verdict.send and create_time == psutil.Process(handler.pid).create_time()
    assert verdict.name == psutil.Process(handler.pid).name()
    verdict, _ = judge(plain.pid, USR1, NEVER)
    assert not verdict.send and verdict.reason == "it does not handle SIGUSR1, which would kill it"
    assert plain.poll() is None


def test_judge_matches_the_basename_of_argv0(started: list[subprocess.Popen[str]]) -> None:
    agent = start(started, HANDLER, argv0="/opt/monitoring/gg-test-agent")
    verdict, _ = judge(agent.pid, USR1, NEVER | {"gg-test-agent"})
    assert not verdict.send and verdict.reason == "gg-test-agent is on [jobs] foreign_never_signal"
    assert judge(agent.pid, USR1, NEVER)[0].send


def test_judge_and_send_refuse_a_process_that_is_gone(started: list[subprocess.Popen[str]]) -> None:
    proc = start(started, HANDLER)
    _, create_time = judge(proc.pid, USR1, NEVER)
    assert create_time is not None
    proc.kill()
    proc.wait()
    verdict, gone_time = judge(proc.pid, USR1, NEVER)
    assert not verdict.send and verdict.reason == "it exited before it could be checked" and gone_time is None
    assert send(proc.pid, create_time, USR1) == "it exited before the signal was sent"


def test_judge_without_a_readable_status(started: list[subprocess.Popen[str]], tmp_path: Path) -> None:
    proc = start(started, HANDLER)
    (tmp_path / str(proc.pid)).mkdir()  # a /proc stand-in with no status file in it: unreadable, not gone
    (tmp_path / str(proc.pid) / "status").mkdir()
    verdict, _ = judge(proc.pid, USR1, NEVER, proc_root=tmp_path)
    assert not verdict.send and verdict.reason.startswith("its /proc status could not be read (Is a directory)")


def test_send_delivers_to_the_process_judged(started: list[subprocess.Popen[str]], tmp_path: Path) -> None:
    flag = tmp_path / "got"
    code = (
        "import signal, time, pathlib; "
        f"signal.signal(signal.SIGUSR1, lambda *a: pathlib.Path({str(flag)!r}).write_text('1')); "
        "print('ready', flush=True); time.sleep(60)"
    )
    proc = start(started, code)
    verdict, create_time = judge(proc.pid, USR1, NEVER)
    assert verdict.send and create_time is not None
    assert send(proc.pid, create_time, USR1) is None
    wait_until(flag.exists, 5, "the handler's file", 0.02)
    assert flag.read_text() == "1" and proc.poll() is None
    assert send(proc.pid, create_time + 10, USR1) == "it exited before the signal was sent"  # not the same process
