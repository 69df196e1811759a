"""The [slurm] commands (actions/slurm.py): placeholders, the timeout, failures,
and who runs them. A small script of the test's own stands in for scontrol: it
writes its argv and uid to a file and exits as told."""

from __future__ import annotations

import json
import pwd
import subprocess
import sys
from pathlib import Path

import pytest


from gpuguard.actions.argv import short_hostname
from gpuguard.actions.slurm import SlurmCommands
from gpuguard.config import ConfigError, SlurmConfig, load
from gpuguard.supervisor.ports import BatchJob

NASTY = "GPU 0: Xid 79 {x} $(reboot) `id`; rm -rf / \"quoted\""


def fake_scontrol(
    tmp_path: Path, code: int = 0, *, sleep_s: float = 0.0, say: str = "", python: str = sys.executable
) -> tuple[list[str], Path]:
    """argv prefix of a fake scontrol and the file it writes {"argv", "uid"} to."""
    out = tmp_path / "calls.json"
    script = tmp_path / "scontrol.py"
    script.write_text(
        "import json, os, sys, time\n"
        f"with open({str(out)!r}, 'w') as f: json.dump({{'argv': sys.argv[1:], 'uid': os.getuid()}}, f)\n"
        f"print({say!r}); sys.stdout.flush()\n"
        f"time.sleep({sleep_s})\n"
        f"sys.exit({code})\n"
    )
    script.chmod(0o755)
    return [python, str(script)], out


def commands(prefix: list[str], **kw: object) -> SlurmCommands:
    config = SlurmConfig(
        drain=(*prefix, "update", "nodename={node}", "state=drain", "reason={reason}"),
        requeue=(*prefix, "requeue", "{job_id}"),
        **kw,  # type: ignore[arg-type]
    )
    return SlurmCommands(lambda: config)


def test_placeholders_fill_one_argument_each(tmp_path: Path) -> None:
    prefix, out = fake_scontrol(tmp_path)
    slurm = commands(prefix, nodes=("n1",))
    result = slurm.drain(BatchJob("123", "n1"), NASTY)
    assert result is not None and result.ok
    assert json.loads(out.read_text())["argv"] == ["update", "nodename=n1", "state=drain", f"reason={NASTY}"]
    assert result.argv == (*prefix, "update", "nodename=n1", "state=drain", f"reason={NASTY}")
    requeued = slurm.requeue(BatchJob("123", "n1"), NASTY)
    assert requeued.ok and requeued.outcome == "exited 0"
    assert json.loads(out.read_text())["argv"] == ["requeue", "123"]


def test_a_job_without_a_node_name_drains_this_host(tmp_path: Path) -> None:
    prefix, out = fake_scontrol(tmp_path)
    assert commands(prefix).drain(BatchJob("5", None), "r") is not None
    assert json.loads(out.read_text())["argv"][1] == f"nodename={short_hostname()}"


def test_a_job_naming_another_node_drains_nothing(tmp_path: Path) -> None:
    """drain runs as root: a caller's SLURMD_NODENAME must not choose which node goes out."""
    prefix, out = fake_scontrol(tmp_path)
    result = commands(prefix, nodes=("n1", "n2")).drain(BatchJob("5", "login01"), "r")
    assert result is not None and not result.ok and result.argv == ()
    assert "'login01'" in result.outcome and "n1, n2" in result.outcome
    assert not out.exists()  # scontrol never ran
    # the host's own name is the only one when [slurm] nodes is empty
    other = commands(prefix).drain(BatchJob("5", "not-" + short_hostname()[:50]), "r")
    assert other is not None and other.argv == ()
    assert not out.exists()


def test_several_nodes_on_one_host_drain_the_one_the_job_names(tmp_path: Path) -> None:
    prefix, out = fake_scontrol(tmp_path)
    named = commands(prefix, nodes=("n1", "n2")).drain(BatchJob("5", "n2"), "r")
    assert named is not None and named.ok
    assert json.loads(out.read_text())["argv"][1] == "nodename=n2"
    # a job that names none, on a host with several: which one is not known, none is drained
    unnamed = commands(prefix, nodes=("n1", "n2")).drain(BatchJob("6", None), "r")
    assert unnamed is not None and unnamed.argv == ()


def test_a_failure_keeps_its_exit_and_output(tmp_path: Path) -> None:
    prefix, _ = fake_scontrol(tmp_path, 1, say="scontrol: error: Requested operation is presently disabled")
    result = commands(prefix).requeue(BatchJob("123", "n1"), "r")
    assert not result.ok and result.exit_code == 1 and not result.timed_out
    assert result.outcome == "exited 1"
    assert result.output_tail == "scontrol: error: Requested operation is presently disabled"


def test_a_command_past_its_timeout_is_killed(tmp_path: Path) -> None:
    prefix, out = fake_scontrol(tmp_path, sleep_s=60)
    result = commands(prefix, timeout_s=0.5).requeue(BatchJob("123", "n1"), "r")
    assert result.timed_out and result.exit_code is None and not result.ok
    assert result.outcome == "timed out after 0.5 s and was killed"
    assert out.exists()  # it did start


def test_a_missing_program_is_a_failure_not_an_exception(tmp_path: Path) -> None:
    slurm = SlurmCommands(lambda: SlurmConfig(requeue=(str(tmp_path / "no-scontrol"), "requeue", "{job_id}")))
    result = slurm.requeue(BatchJob("1", None), "r")
    assert not result.ok and result.exit_code is None and result.outcome.startswith("could not start")


def test_empty_commands_are_off(tmp_path: Path) -> None:
    slurm = SlurmCommands(lambda: SlurmConfig())
    assert not slurm.requeue_enabled
    assert slurm.drain(BatchJob("1", None), "r") is None
    assert not slurm.requeue(BatchJob("1", None), "r").ok


def test_the_config_is_read_at_every_call(tmp_path: Path) -> None:
    """A SIGHUP reload swaps the config: the next hand-off uses the new one."""
    prefix, _ = fake_scontrol(tmp_path)
    config = SlurmConfig()
    slurm = SlurmCommands(lambda: config)
    assert not slurm.requeue_enabled
    config = SlurmConfig(requeue=(*prefix, "requeue", "{job_id}"), store_wait_s=12.0)
    assert slurm.requeue_enabled and slurm.store_wait_s == 12.0


def test_requeue_runs_as_the_jobs_user_and_drain_as_the_daemon(open_dir: Path, nobody_python: str) -> None:
    """Slurm then refuses a requeue of someone else's job id by itself."""
    nobody = pwd.getpwnam("nobody")
    prefix, out = fake_scontrol(open_dir, python=nobody_python)
    out.touch()
    out.chmod(0o666)
    slurm = commands(prefix, nodes=("n1",))
    job = BatchJob("123", "n1", (nobody.pw_uid, nobody.pw_gid, ()))
    assert slurm.requeue(job, "r").ok
    assert json.loads(out.read_text())["uid"] == nobody.pw_uid
    assert slurm.drain(job, "r") is not None
    assert json.loads(out.read_text())["uid"] == 0


# --- [slurm] in the config ---------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "key", "problem"),
    [
        ('requeue = ["scontrol", "requeue", "{jobid}"]', "slurm.requeue[2]", "unknown placeholder {jobid}"),
        ('requeue = ["scontrol", "requeue", "{job_id"]', "slurm.requeue[2]", "bad placeholder"),
        ('requeue = ["", "{job_id}"]', "slurm.requeue", "must name a program"),
        ('drain = ["scontrol", "update", "nodename={node}"]', "slurm.drain", "set requeue too"),
        ('requeue = "scontrol requeue {job_id}"', "slurm.requeue", "expected an array of strings"),
        ('requeue = ["scontrol", "requeue", "{job_id}"]\ntimeout_s = 0', "slurm.timeout_s", ""),
        ('requeue = ["scontrol", "requeue", "{job_id}"]\nnodes = ["n[1-2]"]', "slurm.nodes[0]", "not one Slurm node name"),
    ],
)
def test_a_bad_slurm_section_is_refused_naming_the_key(tmp_path: Path, toml: str, key: str, problem: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f"[slurm]\n{toml}\n")
    with pytest.raises(ConfigError) as refused:
        load(path)
    assert refused.value.key == key and problem in refused.value.problem


def test_gpuguardd_exits_2_on_a_bad_placeholder(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[slurm]\nrequeue = ["scontrol", "requeue", "{hostname}"]\n')
    done = subprocess.run(
        [str(Path(sys.executable).parent / "gpuguardd"), "--config", str(path), "--simulate", "1",
         "--state-dir", str(tmp_path / "state"), "--socket", str(tmp_path / "gg.sock")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "slurm.requeue[2]" in done.stderr and "{hostname}" in done.stderr


def test_a_good_slurm_section_loads(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '[slurm]\ndrain = ["scontrol", "update", "nodename={node}", "state=drain", "reason=gpuguard {reason}"]\n'
        'requeue = ["scontrol", "requeue", "{job_id}"]\ntimeout_s = 10.0\nstore_wait_s = 60.0\n'
    )
    slurm = load(path).slurm
    assert slurm.requeue == ("scontrol", "requeue", "{job_id}") and slurm.timeout_s == 10.0 and slurm.store_wait_s == 60.0
