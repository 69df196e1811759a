"""Issue #17 item 1 (a) and (b), through the real `gpuguardctl` against a real
`gpuguardd --simulate 2`: the changing commands say what they did in a
sentence (--json: the daemon's reply), and `healthy` with no healthy GPU
prints nothing on stdout, a sentence on stderr, and exits 1."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from harness import REPO, DaemonProc, wait_until

pytestmark = pytest.mark.e2e

TRAINER = REPO / "tests" / "supervisor" / "jobs" / "trainer.py"
WAIT_S = 20.0
# what the old output looked like: `ok=True detail=... changed=True`
KEY_VALUE = re.compile(r"\b\w+=\S")


def _say(d: DaemonProc, *args: str) -> str:
    """The command's stdout, which must be one sentence-like line, not key=value pairs."""
    out = d.ctl(*args).stdout
    assert out.count("\n") == 1 and not KEY_VALUE.search(out.replace("--", "")), out
    return out.rstrip("\n")


def _reply(d: DaemonProc, *args: str) -> dict[str, object]:
    reply = json.loads(d.ctl(args[0], "--json", *args[1:]).stdout)  # before a job's command
    assert isinstance(reply, dict)
    return reply


def test_gpu_commands_say_what_they_did(daemon: DaemonProc) -> None:  # noqa: F811
    uuid0, uuid1 = daemon.gpu(0)["uuid"], daemon.gpu(1)["uuid"]
    gpu0, gpu1 = f"GPU 0 ({uuid0[:12]})", f"GPU 1 ({uuid1[:12]})"
    assert _say(daemon, "exclude", "1", "--reason", "fan noise") == (
        f"{gpu1} is excluded: fan noise. It stays out of service until `gpuguardctl include 1`."
    )
    assert _say(daemon, "include", "1") == (
        f"{gpu1} is back in service: its exclusion, Xids, hang suspicion and probation are forgotten. It is healthy."
    )
    assert _say(daemon, "include", uuid1) == f"{gpu1} was not excluded and nothing was held against it. It is healthy."
    assert _say(daemon, "inject", "0", "thermal", "95") == f"{gpu0}: temperature held at 95 C with thermal slowdown."
    reset = _say(daemon, "reset", "0")
    assert reset.startswith(f"{gpu0} was reset. The reset said: ") and "temperature back to normal" in reset

    assert _reply(daemon, "exclude", "0") == {"gpu": uuid0, "index": 0, "state": "excluded", "reason": "excluded by operator"}
    included = _reply(daemon, "include", "0")
    assert included["gpu"] == uuid0 and included["changed"] is True
    assert _reply(daemon, "inject", "1", "ecc-sbe", "3") == {"gpu": uuid1, "index": 1, "injected": "GPU 1: corrected ECC +3"}
    reset_reply = _reply(daemon, "reset", "1")
    assert reset_reply["ok"] is True and "reset #1" in str(reset_reply["detail"])


def test_job_commands_say_what_they_did(daemon: DaemonProc, tmp_path: Path) -> None:  # noqa: F811
    run = ("run", "--workdir", str(tmp_path), "--checkpoint", "ck.pt", "--name")
    trainer = ("--", sys.executable, str(TRAINER), "--every", "8", "--step-s", "0.05")  # a checkpoint each 0.4 s
    started = _say(daemon, *run, "train", *trainer)
    assert re.fullmatch(r"Job train is running on GPU-[0-9a-f]{8} \(pid \d+, attempt 1\)\. "
                        r"Its output: gpuguardctl logs train", started), started  # fmt: skip
    reply = _reply(daemon, *run, "other", *trainer)
    assert reply["name"] == "other" and reply["state"] == "running" and reply["attempt"] == 1
    assert isinstance(reply["pid"], int) and len(reply["gpus"]) == 1  # type: ignore[arg-type]

    waiting = _say(daemon, *run, "third", "--", "sleep", "60")  # both GPUs are taken
    assert waiting == "Job third is waiting: no healthy GPU can take it now. It starts when one can."

    def snapshots() -> list[dict[str, object]]:
        return json.loads(daemon.ctl("snapshots", "train", "--json").stdout)

    ids = [s["id"] for s in wait_until(lambda: len(snapshots()) >= 2 and snapshots(), WAIT_S, "two snapshots")]
    back = _say(daemon, "rollback", "train", str(ids[0]))  # the newest: retention keeps the 5 newest
    assert re.fullmatch(rf"Job train goes back to snapshot {re.escape(str(ids[0]))} \(/\S+\); it is \w+ now\.", back), back
    rolled = _reply(daemon, "rollback", "train")
    assert rolled["name"] == "train" and str(rolled["path"]).endswith(f"{rolled['snapshot']}.pt")

    stopped = _say(daemon, "stop", "third")
    assert stopped in ("Job third is stopped.", "Job third is stopping; its GPUs are freed once it and everything "
                       "it started have exited.")  # fmt: skip
    assert _reply(daemon, "stop", "other") == {"name": "other", "state": "stopping"}
    assert _say(daemon, "stop", "train").startswith("Job train is stop")


def test_run_wait_json_prints_the_ended_job(daemon: DaemonProc, tmp_path: Path) -> None:  # noqa: F811
    done = daemon.ctl("run", "--wait", "--json", "--workdir", str(tmp_path), "--name", "quick", "--", "true")
    job = json.loads(done.stdout)  # one JSON document: the job's entry once it has ended
    assert (done.returncode, job["name"], job["state"], job["exit_code"]) == (0, "quick", "succeeded", 0)


def test_healthy_with_no_healthy_gpu_exits_1_and_says_why_on_stderr(daemon: DaemonProc) -> None:  # noqa: F811
    uuid1 = daemon.gpu(1)["uuid"]
    daemon.ctl("inject", "0", "ecc-dbe")
    daemon.wait_for(lambda s: s["gpus"][0]["state"] == "faulted", what="GPU 0 faulted")
    for fmt, line in (("cuda", uuid1), ("uuid", uuid1), ("index", "1")):  # the contract's one line, as before
        one = daemon.ctl("healthy", "--format", fmt)
        assert (one.returncode, one.stdout, one.stderr) == (0, f"{line}\n", "")
    daemon.ctl("exclude", "1")
    for fmt in ("cuda", "uuid", "index"):
        none = daemon.ctl("healthy", "--format", fmt, check=False)
        assert (none.returncode, none.stdout) == (1, "")
        assert none.stderr == "gpuguardctl: healthy: no GPU is healthy now (gpuguardctl status says why)\n"
