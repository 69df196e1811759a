"""gpuguardctl in-process against a ControlServer with a fake controller."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from control import UUID0, UUID1, FakeController, serving  # tests/control, a package beside this file
from gpuguard import config as config_module
from gpuguard.ctl import SESSION_ENV, main


class Fake(FakeController):
    """The shared fake, with `events` as the Controller protocol has it now."""

    def events(  # type: ignore[override]
        self, limit: int, gpu: str | None, job: str | None, *, since_id: int | None = None, since_ts: float | None = None
    ) -> list[dict[str, Any]]:
        self._record("events", limit, gpu, job, since_id, since_ts)
        out = [e for e in self.events_list if job is None or e["job"] == job]
        return out[-limit:] if limit else []


@pytest.fixture
def fake() -> FakeController:
    return Fake()


@pytest.fixture
def sock(tmp_path: Path, fake: FakeController, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.delenv("GPUGUARD_SOCKET", raising=False)
    with capture_logs(), serving(tmp_path, fake) as (_, path):  # the server's logs stay off stdout
        yield path


def ctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_status_table(sock: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = ctl(capsys, "--socket", str(sock), "status")
    assert code == 0
    gpu_header, gpu0, gpu1, _, note, _, job_header, job, _, daemon = out.splitlines()
    assert gpu_header.split() == ["GPU", "UUID", "STATE", "TEMP", "UTIL", "MEM", "JOBS"]
    assert gpu0.split() == ["0", "GPU-0a1b2c3d", "healthy", "41C", "97%", "40.0/80.0GiB", "train"]
    assert gpu1.split() == ["1", "GPU-9f8e7d6c", "excluded", "-", "-", "-", "-"]
    assert note == "GPU 1: Excluded: Xid 79: GPU has fallen off the bus."
    assert job_header.split() == ["JOB", "STATE", "GPUS", "ATTEMPT", "RESTARTS", "PID", "CHECKPOINT"]
    assert job.split() == ["train", "running", "0", "2", "1", "777", "/data/run/last.pt"]  # GPUs by index
    assert daemon == "daemon: gpuguardd 0.1.0, backend simulated, pid 4242, up 1h02m"
    assert "\x1b" not in out  # not a terminal: no colour


def test_status_json_is_the_daemons_dict(sock: Path, fake: FakeController, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = ctl(capsys, "status", "--json", "--socket", str(sock))  # --socket after the command works too
    assert code == 0 and json.loads(out) == fake.status()
    assert out.startswith('{\n  "daemon"')


def test_events(sock: Path, fake: FakeController, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = ctl(capsys, "--socket", str(sock), "events")
    assert code == 0
    header, first, second = out.splitlines()
    assert header.split() == ["TIME", "SEVERITY", "KIND", "GPU", "JOB", "MESSAGE"]
    assert first.split()[:5] == ["2025-01-01T00:00:00Z", "info", "job_started", "-", "train"]
    assert second.split()[:4] == ["2025-01-01T00:01:00Z", "critical", "xid", "GPU-9f8e7d6c"]
    assert fake.calls[-1][:2] == ("events", (100, None, None, None, None))  # the newest 100 by default
    assert ctl(capsys, "--socket", str(sock), "events", "--since", "41")[0] == 0
    assert fake.calls[-1][:2] == ("events", (100, None, None, 41, None))
    assert ctl(capsys, "--socket", str(sock), "events", "--since", "2025-01-31T12:00:00Z")[0] == 0
    assert fake.calls[-1][:2] == ("events", (100, None, None, None, 1738324800.0))
    code, out, _ = ctl(capsys, "--socket", str(sock), "events", "--json", "--limit", "1", "--gpu", "1", "--job", "x")
    assert code == 0 and isinstance(json.loads(out), list)
    assert fake.calls[-1][:2] == ("events", (1, "1", "x", None, None))
    code, _, err = ctl(capsys, "--socket", str(sock), "events", "--limit", "-1")
    assert code == 2 and "--limit must be 0 or more" in err


def test_run_sends_absolute_paths_and_a_clean_environment(
    sock: Path, fake: FakeController, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPUGUARD_SOCKET", str(sock))  # the socket comes from here
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "1000")
    monkeypatch.setenv("DATASET", "/data/coco")
    for private in SESSION_ENV:
        monkeypatch.setenv(private, "session-private")
    argv = ["run", "--name", "train", "--gpus", "2", "--min-gpus", "1", "--checkpoint", "runs/last.pt",
            "--max-restarts", "3", "--", "python", "train.py", "--epochs", "3", "--", "x"]
    code, out, _ = ctl(capsys, *argv)
    assert code == 0 and out == "Job train is starting. Its output: gpuguardctl logs train\n"
    name, (spec,), _ = fake.calls[-1]
    env = spec.pop("env")
    assert spec == {
        "name": "train",
        "command": ["python", "train.py", "--epochs", "3", "--", "x"],
        "gpus": 2,
        "min_gpus": 1,
        "checkpoint": str(tmp_path / "runs" / "last.pt"),
        "workdir": str(tmp_path),
        "max_restarts": 3,
        "standby": False,
    }
    assert env["DATASET"] == "/data/coco" and env["PATH"] == os.environ["PATH"]
    assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "GPUGUARD_SOCKET", *SESSION_ENV} & set(env)
    assert "session-private" not in env.values()


def test_run_env_flags(
    sock: Path, fake: FakeController, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATASET", "/data/coco")
    monkeypatch.setenv("SSH_AUTH_SOCK", "/tmp/ssh-agent.sock")
    s = ["--socket", str(sock), "run", "--name", "t"]

    def sent(*flags: str) -> dict[str, str]:
        code, _, err = ctl(capsys, *s, *flags, "--", "python", "t.py", "--env", "not-a-flag")
        assert code == 0, err
        spec = fake.calls[-1][1][0]
        assert spec["command"] == ["python", "t.py", "--env", "not-a-flag"]  # after --: the job's own
        return spec["env"]

    env = sent("--env", "DATASET=/data/voc", "--env", "SEED=1=2", "--env", "EMPTY=", "--env", "DISPLAY=:0")
    assert env["DATASET"] == "/data/voc" and env["SEED"] == "1=2" and env["EMPTY"] == ""
    assert env["DISPLAY"] == ":0" and "SSH_AUTH_SOCK" not in env  # asked for by name: sent
    assert sent("--no-env") == {}
    assert sent("--no-env", "--env", "A=b", "--env", "A=c") == {"A": "c"}
    calls = len(fake.calls)
    for bad, message in [("NOEQUALS", "give KEY=VALUE"), ("=x", "give KEY=VALUE"),
                         ("GPUGUARD_RESUME_FROM=/x", "set this variable themselves"),
                         ("NOTIFY_SOCKET=/run/x", "set this variable themselves")]:  # fmt: skip
        code, _, err = ctl(capsys, *s, "--env", bad, "--", "true")
        assert code == 2 and message in err, (bad, err)
    assert len(fake.calls) == calls


def test_run_help_says_what_environment_is_sent(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert info.value.code == 0
    assert "--env KEY=VALUE" in out and "--no-env" in out
    assert all(name in out for name in SESSION_ENV) and "NOTIFY_SOCKET" in out and "GPUGUARD_*" in out


def test_run_workdir_and_usage_errors(
    sock: Path, fake: FakeController, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, _ = ctl(capsys, "--socket", str(sock), "run", "--name", "t", "--workdir", "job", "--checkpoint", "/abs/c.pt", "sleep", "1")
    spec = fake.calls[-1][1][0]
    assert code == 0 and spec["workdir"] == str(tmp_path / "job") and spec["checkpoint"] == "/abs/c.pt"
    assert spec["command"] == ["sleep", "1"] and spec["gpus"] == 1 and spec["min_gpus"] is None
    calls = len(fake.calls)
    code, _, err = ctl(capsys, "--socket", str(sock), "run", "--name", "t", "--")
    assert code == 2 and "give the job's command" in err
    code, _, err = ctl(capsys, "--socket", str(sock), "run", "--name", "t", "--gpus", "1", "--min-gpus", "2", "--", "x")
    assert code == 2 and "--min-gpus must not exceed --gpus" in err
    with pytest.raises(SystemExit) as info:
        main(["--socket", str(sock), "run", "--", "x"])  # no --name: argparse's own exit 2
    assert info.value.code == 2
    assert len(fake.calls) == calls


@pytest.mark.parametrize(("fmt", "line"), [(None, UUID0), ("cuda", UUID0), ("uuid", UUID0), ("index", "0")])
def test_healthy(sock: Path, fake: FakeController, capsys: pytest.CaptureFixture[str], fmt: str | None, line: str) -> None:
    fake.gpus[1]["state"] = "healthy"
    argv = ["--socket", str(sock), "healthy"] + (["--format", fmt] if fmt else [])
    code, out, _ = ctl(capsys, *argv)
    expected = {UUID0: f"{UUID0},{UUID1}", "0": "0,1"}[line]
    assert (code, out) == (0, expected + "\n")


def test_healthy_when_none_is(sock: Path, fake: FakeController, capsys: pytest.CaptureFixture[str]) -> None:
    fake.gpus[0]["state"] = "faulted"
    code, out, err = ctl(capsys, "--socket", str(sock), "healthy")
    assert (code, out) == (1, "") and err == "gpuguardctl: healthy: no GPU is healthy now (gpuguardctl status says why)\n"


@pytest.mark.parametrize(("status", "code"), [("healthy", 0), ("unhealthy", 1), ("unknown", 2)])
def test_check(sock: Path, fake: FakeController, capsys: pytest.CaptureFixture[str], status: str, code: int) -> None:
    fake.verdict = {"status": status, "message": f"gpuguard: {status} because"}
    assert ctl(capsys, "--socket", str(sock), "check") == (code, f"gpuguard: {status} because\n", "")


def test_unreachable_daemon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.sock"
    code, out, err = ctl(capsys, "--socket", str(missing), "status")
    assert code == 3 and out == "" and str(missing) in err
    code, out, err = ctl(capsys, "--socket", str(missing), "check")
    assert code == 2 and out.startswith("gpuguard: unknown:") and str(missing) in out and out.count("\n") == 1


def test_changing_commands_and_their_failures(sock: Path, fake: FakeController, capsys: pytest.CaptureFixture[str]) -> None:
    s = ["--socket", str(sock)]
    assert ctl(capsys, *s, "exclude", "1", "--reason", "bad fan") == (
        0, "GPU 1 (GPU-9f8e7d6c) is excluded: bad fan. It stays out of service until `gpuguardctl include 1`.\n", "")
    code, out, _ = ctl(capsys, *s, "exclude", "1", "--json")
    assert code == 0 and json.loads(out) == {"gpu": UUID1, "index": 1, "state": "excluded", "reason": "excluded by operator"}
    assert ctl(capsys, *s, "include", UUID1)[0] == 0
    assert fake.calls[-1][:2] == ("include", (UUID1,))
    assert ctl(capsys, *s, "inject", "0", "xid", "79") == (0, "GPU-0a1b2c3d: xid 79.\n", "")
    assert ctl(capsys, *s, "stop", "train") == (
        0, "Job train is stopping; its GPUs are freed once it and everything it started have exited.\n", "")
    assert ctl(capsys, *s, "rollback", "train", "s1") == (0, "Job train goes back to snapshot s1.\n", "")
    assert fake.calls[-1][:2] == ("rollback", ("train", "s1"))
    code, out, err = ctl(capsys, *s, "reset", "0")
    assert (code, out) == (1, "") and err == "gpuguardctl: reset: GPU 0: nvidia-smi exited 255\n"
    assert ctl(capsys, *s, "exclude", "9")[0] == 1  # not found
    assert ctl(capsys, *s, "stop", "ghost")[0] == 1
    code, _, err = ctl(capsys, *s, "inject", "0", "melt")  # the daemon says: bad request
    assert code == 2 and "unknown fault 'melt'" in err
    code, _, err = ctl(capsys, *s, "inject", "0", "explode")
    assert code == 1 and "internal error in inject" in err


def test_snapshots(sock: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = ctl(capsys, "--socket", str(sock), "snapshots", "train")
    header, newest, older = out.splitlines()
    assert code == 0 and header.split() == ["ID", "PATH", "EPOCH"] and newest.split()[0] == "s2"
    code, out, _ = ctl(capsys, "--socket", str(sock), "snapshots", "train", "--json")
    assert code == 0 and [s["id"] for s in json.loads(out)] == ["s2", "s1"]


def test_socket_from_the_config(
    sock: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[Path | None] = []

    def load(path: Path | None) -> config_module.Config:
        seen.append(path)
        return config_module.Config(daemon=replace(config_module.DaemonConfig(), socket=sock))

    monkeypatch.setattr(config_module, "load", load, raising=False)
    assert ctl(capsys, "check")[0] == 0
    assert ctl(capsys, "--config", str(tmp_path / "c.toml"), "check")[0] == 0
    assert seen == [None, tmp_path / "c.toml"]


def test_a_config_error_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("GPUGUARD_SOCKET", raising=False)

    def load(path: Path | None) -> config_module.Config:
        raise config_module.ConfigError(path, "daemon.socket", "must be a string")

    monkeypatch.setattr(config_module, "load", load, raising=False)
    code, out, err = ctl(capsys, "--config", "/etc/x.toml", "status")
    assert (code, out) == (2, "") and err == "gpuguardctl: /etc/x.toml: daemon.socket: must be a string\n"
    code, out, _ = ctl(capsys, "--config", "/etc/x.toml", "check")
    assert code == 2 and out.startswith("gpuguard: unknown: /etc/x.toml")


def test_a_real_config_file_names_the_socket(
    sock: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not hasattr(config_module, "load"):
        pytest.skip("gpuguard.config.load is not written yet")
    conf = tmp_path / "config.toml"
    conf.write_text(f'[daemon]\nsocket = "{sock}"\n')
    assert ctl(capsys, "--config", str(conf), "check")[0] == 0
    assert os.environ.get("GPUGUARD_SOCKET") is None
