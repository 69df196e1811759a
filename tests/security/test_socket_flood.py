"""The control socket stays usable under abuse (issue #14).

User `nobody` opens a thousand idle connections and another of its processes
churns connect/close in a loop, both on this test's own socket; meanwhile
`check` as root and as a third uid answers every time within a second, and
once nobody's connections have sat idle past the request deadline, nobody's
own slots are free again although it still holds every socket open. The
tests run as root, so the abusers run as nobody in subprocesses (see
tests/conftest.py)."""

from __future__ import annotations

import json
import select
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from control import FakeController, serving  # tests/control, a package beside this one
from harness import NOBODY, NOBODY_ENV
from gpuguard.control.client import request
from gpuguard.control.limits import Limits

IDLE = 1000
FLOOD_S = 3.0
REQUEST_TIMEOUT_S = 6.0  # how long an idle connection may keep its slot
ANSWER_S = REQUEST_TIMEOUT_S / 2  # a check answered within this did not wait for an idle slot to be dropped
STRANGER = 4242  # a third uid, with no passwd entry

HOLDER = """
import json, resource, socket, sys, time
path, count = sys.argv[1], int(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, count + 64)), hard))
conns = []
for _ in range(count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    while True:
        try:
            s.connect(path)
            break
        except BlockingIOError:  # the backlog is full: wait for the daemon to drain it
            time.sleep(0.001)
    conns.append(s)
time.sleep(0.5)  # the daemon has answered whom it refused by now
held = busy = 0
for s in conns:
    s.setblocking(False)
    try:
        data = s.recv(4096)
    except BlockingIOError:
        held += 1
        continue
    busy += b'"code":"busy"' in data
print(json.dumps({"opened": len(conns), "held": held, "busy": busy}), flush=True)
sys.stdin.read()  # hold every socket open until the test says so
"""

CHURNER = """
import json, socket, sys, time
path, until, most = sys.argv[1], time.monotonic() + float(sys.argv[2]), int(sys.argv[3])
n = 0
while n < most and time.monotonic() < until:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(path)
    except OSError:
        pass
    s.close()
    n += 1
print(json.dumps({"churned": n}))
"""

CHECKER = """
import json, sys, time
from gpuguard.control.client import request
path, until = sys.argv[1], time.monotonic() + float(sys.argv[2])
out = []
while time.monotonic() < until:
    start = time.monotonic()
    try:
        status = request(path, "check", {}, timeout_s=5)["status"]
    except Exception as exc:  # any failure is a result to report
        status = f"{type(exc).__name__}: {exc}"
    out.append([status, time.monotonic() - start])
    time.sleep(0.05)
print(json.dumps(out))
"""


def spawn(python: str, script: str, *args: str, uid: int = NOBODY.pw_uid, gid: int = NOBODY.pw_gid) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [python, "-c", script, *args], user=uid, group=gid, extra_groups=[], env=NOBODY_ENV, cwd="/",
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def first_line(child: subprocess.Popen[str], timeout_s: float) -> dict[str, Any]:
    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout], [], [], timeout_s)
    assert ready, f"no output within {timeout_s} s"
    line = child.stdout.readline()
    assert line, child.stderr.read() if child.stderr else "no output"
    return json.loads(line)


def finished(child: subprocess.Popen[str]) -> Any:
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    return json.loads(out)


def checks_as_root(path: Path, duration_s: float) -> list[tuple[str, float]]:
    out = []
    until = time.monotonic() + duration_s
    while time.monotonic() < until:
        start = time.monotonic()
        status = request(path, "check", {}, timeout_s=5)["status"]
        out.append((status, time.monotonic() - start))
        time.sleep(0.02)
    return out


@pytest.mark.root
def test_check_answers_while_another_uid_holds_and_churns_connections(
    nobody_python: str, open_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    limits = Limits()
    children: list[subprocess.Popen[str]] = []
    with serving(open_dir, FakeController(), mode=0o666, request_timeout_s=REQUEST_TIMEOUT_S) as (_, path):
        try:
            holder = spawn(nobody_python, HOLDER, str(path), str(IDLE))
            children.append(holder)
            flood = first_line(holder, 30)
            held_since = time.monotonic()
            churner = spawn(nobody_python, CHURNER, str(path), str(FLOOD_S), "1000000")
            stranger = spawn(nobody_python, CHECKER, str(path), str(FLOOD_S), uid=STRANGER, gid=STRANGER)
            children += [churner, stranger]
            as_root = checks_as_root(path, FLOOD_S)
            churned = finished(churner)["churned"]
            as_stranger = finished(stranger)

            with capsys.disabled():
                print(
                    f"\nflood: {flood['opened']} idle connections ({flood['held']} kept), {churned} connects churned;"
                    f" check max {max(t for _, t in as_root) * 1000:.0f} ms as root ({len(as_root)}),"
                    f" {max((t for _, t in as_stranger), default=0) * 1000:.0f} ms as uid {STRANGER} ({len(as_stranger)})"
                )
            assert flood["opened"] == IDLE
            assert flood["held"] <= limits.per_uid + limits.quick_per_uid  # the rest were told "busy" at once
            assert flood["held"] + flood["busy"] == IDLE, flood
            assert churned > 100
            for who, results in (("root", as_root), (f"uid {STRANGER}", as_stranger)):
                assert len(results) >= 5, (who, results)
                assert [s for s, _ in results] == ["healthy"] * len(results), (who, results)
                assert max(t for _, t in results) < ANSWER_S, (who, results)

            # idle connections do not pin their slots: past the deadline nobody may ask again,
            # though the holder still has every socket open
            time.sleep(max(0.0, held_since + REQUEST_TIMEOUT_S + 0.5 - time.monotonic()))
            again = spawn(nobody_python, CHECKER, str(path), "0.5")
            children.append(again)
            assert holder.poll() is None
            assert {s for s, _ in finished(again)} == {"healthy"}
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                child.communicate(timeout=30)
