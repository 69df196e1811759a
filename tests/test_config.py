"""The config loader: TOML files in, a frozen Config or an operator-worded ConfigError out."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from gpuguard.config import Config, ConfigError, DaemonConfig, JobEntry, load, loading, with_overrides

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"
JOB_MARKER = "# [[job]]\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def error(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.path == path and str(info.value).startswith(f"{path}: ")
    return info.value


# -- finding and reading the file


def test_missing_default_file_means_built_in_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    assert load() == Config() and load().source is None


def test_an_existing_default_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[monitor]\npoll_interval_s = 2.5\n")
    monkeypatch.setattr(loading, "DEFAULT_CONFIG_PATH", path)
    config = load()
    assert config.monitor.poll_interval_s == 2.5 and config.source == path


def test_an_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == f"{path}: no such file"


def test_an_unreadable_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: cannot read: "):
        load(tmp_path)  # a directory


def test_a_file_that_is_not_utf8_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b'[daemon]\nadmin_group = "gr\xfcppe"\n')
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == f"{path}: not UTF-8 (line 2, byte 26)"


def test_invalid_toml_names_the_line(tmp_path: Path) -> None:
    exc = error(tmp_path, "[monitor]\npoll_interval_s = = 1\n")
    assert exc.key is None and "invalid TOML" in exc.problem and "line 2" in exc.problem


def test_an_empty_file_means_the_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert load(path) == dataclasses.replace(Config(), source=path)


# -- types, driven by the dataclasses


def test_values_take_their_field_types(tmp_path: Path) -> None:
    config = load(
        write(
            tmp_path,
            '[daemon]\nsocket = "/tmp/g.sock"\nevent_retention_days = 7\n'
            "[monitor]\nnvml_events = false\nhang_idle_util_pct = 10\n"
            '[reset]\ncommand = ["/usr/bin/reset-gpu", "{pci_bus_id}", "{index}"]\n',
        )
    )
    assert config.daemon.socket == Path("/tmp/g.sock")
    assert config.daemon.event_retention_days == 7.0 and isinstance(config.daemon.event_retention_days, float)
    assert config.monitor.nvml_events is False and config.monitor.hang_idle_util_pct == 10
    assert config.reset.command == ("/usr/bin/reset-gpu", "{pci_bus_id}", "{index}")
    assert config.daemon.state_dir == DaemonConfig().state_dir


@pytest.mark.parametrize(("written", "mode"), [('"0666"', 0o666), ('"600"', 0o600), ("0o640", 0o640), ("416", 0o640)])
def test_socket_mode_takes_octal_strings_and_integers(tmp_path: Path, written: str, mode: int) -> None:
    assert load(write(tmp_path, f"[daemon]\nsocket_mode = {written}\n")).daemon.socket_mode == mode


def test_unknown_section_suggests_the_close_one(tmp_path: Path) -> None:
    exc = error(tmp_path, "[monitr]\npoll_interval_s = 1.0\n")
    assert (exc.key, exc.problem) == ("monitr", 'unknown section; did you mean "monitor"?')


def test_unknown_key_suggests_the_close_one(tmp_path: Path) -> None:
    exc = error(tmp_path, "[monitor]\npoll_intervall_s = 1.0\n")
    assert (exc.key, exc.problem) == ("monitor.poll_intervall_s", 'unknown key; did you mean "poll_interval_s"?')


def test_unknown_key_without_a_close_one(tmp_path: Path) -> None:
    assert error(tmp_path, "[jobs]\nbanana = 1\n").problem == "unknown key"
    assert error(tmp_path, '[[job]]\nname = "a"\ncommand = ["x"]\ngpu = 1\n').key == "job[0].gpu"


def test_source_is_not_a_key_of_the_file(tmp_path: Path) -> None:
    assert error(tmp_path, 'source = "/etc/other.toml"\n').problem == "unknown key"


def test_the_message_names_file_key_expected_and_given(tmp_path: Path) -> None:
    path = write(tmp_path, '[monitor]\npoll_interval_s = "fast"\n')
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == f'{path}: monitor.poll_interval_s: expected a number, got string "fast"'


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ('[daemon]\nsocket_mode = "rw-rw----"\n', "daemon.socket_mode", 'expected an octal mode such as "0660" or 0o660, got string "rw-rw----"'),
        ('[daemon]\nsocket_mode = "0669"\n', "daemon.socket_mode", 'expected an octal mode such as "0660" or 0o660, got string "0669"'),
        ("[daemon]\nsocket_mode = true\n", "daemon.socket_mode", 'expected an octal mode such as "0660" or 0o660, got boolean true'),
        ("[monitor]\nhang_idle_util_pct = true\n", "monitor.hang_idle_util_pct", "expected an integer, got boolean true"),
        ("[monitor]\npoll_interval_s = false\n", "monitor.poll_interval_s", "expected a number, got boolean false"),
        ("[jobs]\nmax_restarts = 2.5\n", "jobs.max_restarts", "expected an integer, got float 2.5"),
        ("[monitor]\nnvml_events = 1\n", "monitor.nvml_events", "expected true or false, got integer 1"),
        ("[daemon]\nlog_level = 3\n", "daemon.log_level", "expected a string, got integer 3"),
        ('[daemon]\nstate_dir = ["/a"]\n', "daemon.state_dir", "expected a non-empty path string, got array"),
        ('[daemon]\nsocket = ""\n', "daemon.socket", 'expected a non-empty path string, got string ""'),
        ("[daemon]\nevent_retention_days = 2024-01-01\n", "daemon.event_retention_days", "expected a number, got date/time 2024-01-01"),
        ("[reset]\ncommand = \"nvidia-smi -r\"\n", "reset.command", 'expected an argv list of strings, never a shell string; got string "nvidia-smi -r"'),
        ('[reset]\ncommand = ["nvidia-smi", 1]\n', "reset.command[1]", "expected a string, got integer 1"),
        ('[jobs]\nforeign_never_signal = "nv-hostengine"\n', "jobs.foreign_never_signal", 'expected an array of strings, got string "nv-hostengine"'),
        ("[jobs]\nforeign_never_signal = [1]\n", "jobs.foreign_never_signal[0]", "expected a string, got integer 1"),
        ("[monitor]\npoll_interval_s = {}\n", "monitor.poll_interval_s", "expected a number, got table"),
        ("monitor = 1\n", "monitor", "expected a table, got integer 1"),
        ('[job]\nname = "a"\n', "job", "expected an array of tables ([[job]]), got table"),
        ('[[job]]\nname = "a"\ncommand = "python train.py"\n', "job[0].command", 'expected an argv list of strings, never a shell string; got string "python train.py"'),
        ('[[job]]\nname = "a"\ncommand = ["x"]\nenv = ["A=1"]\n', "job[0].env", "expected a table of strings, got array"),
        ('[[job]]\nname = "a"\ncommand = ["x"]\nenv = { A = 1 }\n', "job[0].env.A", "expected a string, got integer 1"),
        ('[[job]]\nname = "a"\ncommand = ["x"]\nmin_gpus = "all"\n', "job[0].min_gpus", 'expected an integer, got string "all"'),
    ],
)
def test_wrong_types(tmp_path: Path, text: str, key: str, problem: str) -> None:
    exc = error(tmp_path, text)
    assert (exc.key, exc.problem) == (key, problem)


def test_a_job_without_a_required_key(tmp_path: Path) -> None:
    exc = error(tmp_path, '[[job]]\nname = "a"\ncommand = ["x"]\n[[job]]\ncommand = ["y"]\n')
    assert (exc.key, exc.problem) == ("job[1].name", "missing; this key is required")
    exc = error(tmp_path, '[[job]]\nname = "a"\n')
    assert exc.key == "job[0].command" and "yolo" in exc.problem


def test_yolo_job_takes_training_arguments(tmp_path: Path) -> None:
    config = load(write(tmp_path, '[[job]]\nname = "y"\nyolo = { data = "/d.yaml", epochs = 3, amp = false, lr0 = 0.01 }\n'))
    assert config.job[0].yolo == (("amp", "False"), ("data", "/d.yaml"), ("epochs", "3"), ("lr0", "0.01"))
    exc = error(tmp_path, '[[job]]\nname = "y"\ncommand = ["x"]\nyolo = { data = "/d.yaml" }\n')
    assert exc.key == "job[0].yolo" and "not both" in exc.problem
    exc = error(tmp_path, '[[job]]\nname = "y"\nyolo = { epochs = 3 }\n')
    assert exc.key == "job[0].yolo" and "data" in exc.problem
    exc = error(tmp_path, '[[job]]\nname = "y"\nyolo = { data = "/d.yaml", save_every_s = -5 }\n')
    assert exc.key == "job[0].yolo.save_every_s" and "0 or more" in exc.problem
    exc = error(tmp_path, '[[job]]\nname = "y"\nyolo = { data = "/d.yaml", save_every_s = "often" }\n')
    assert exc.key == "job[0].yolo.save_every_s" and "often" in exc.problem


# -- value checks


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("[monitor]\npoll_interval_s = 0\n", "monitor.poll_interval_s", "must be greater than 0; got 0.0"),
        ("[monitor]\nnvml_timeout_s = -1.5\n", "monitor.nvml_timeout_s", "must be greater than 0"),
        ("[monitor]\nhang_timeout_s = inf\n", "monitor.hang_timeout_s", "must be a finite number; got inf"),
        ("[jobs]\ncheckpoint_grace_s = nan\n", "jobs.checkpoint_grace_s", "must be a finite number; got nan"),
        ("[reset]\ntimeout_s = 0.0\n", "reset.timeout_s", "must be greater than 0"),
        ("[daemon]\nevent_retention_days = 0\n", "daemon.event_retention_days", "must be greater than 0"),
        ("[daemon]\nevent_retention_max_rows = 0\n", "daemon.event_retention_max_rows", "must be 1 or more; got 0"),
        ("[jobs]\nmax_restarts = -1\n", "jobs.max_restarts", "must be 0 or more; got -1"),
        ("[jobs]\nsnapshots_keep = 0\n", "jobs.snapshots_keep", "must be 1 or more"),
        ("[reset]\nmax_per_gpu_per_day = -2\n", "reset.max_per_gpu_per_day", "must be 0 or more"),
        ("[health]\nretired_pages_degraded = -1\n", "health.retired_pages_degraded", "must be 0 or more"),
        ("[health]\necc_corrected_rate_degraded_per_h = -0.5\n", "health.ecc_corrected_rate_degraded_per_h", "must be 0 or more"),
        ("[monitor]\nhang_idle_util_pct = 101\n", "monitor.hang_idle_util_pct", "must be a percentage, 0 to 100; got 101"),
        ("[monitor]\nhang_idle_util_pct = -1\n", "monitor.hang_idle_util_pct", "must be a percentage"),
        ("[health]\ntemperature_degraded_c = 95\n", "health.temperature_degraded_c", "must be below temperature_faulted_c (95); got 95"),
        ("[jobs]\nbackoff_initial_s = 301\n", "jobs.backoff_initial_s", "must not exceed backoff_max_s (300.0); got 301.0"),
        ('[daemon]\nlog_level = "verbose"\n', "daemon.log_level", 'must be one of debug, info, warning, error; got "verbose"'),
        ('[daemon]\nlog_format = "text"\n', "daemon.log_format", 'must be one of auto, console, json; got "text"'),
        ("[daemon]\nsocket_mode = 0o1777\n", "daemon.socket_mode", "must be permission bits, at most 0o777; got 0o1777"),
        ("[daemon]\nsocket_mode = -1\n", "daemon.socket_mode", "must be 0 or more"),
        ('[daemon]\nadmin_group = ""\n', "daemon.admin_group", "must not be empty"),
        ('[jobs]\ncheckpoint_signal = "USR1"\n', "jobs.checkpoint_signal", 'in its SIG form, such as "SIGUSR1"; got "USR1"; did you mean "SIGUSR1"?'),
        ('[jobs]\ncheckpoint_signal = "SIGNOPE"\n', "jobs.checkpoint_signal", 'got "SIGNOPE"'),
        ('[jobs]\ncheckpoint_signal = "SIGKILL"\n', "jobs.checkpoint_signal", "SIGKILL cannot be caught"),
        ('[jobs]\nforeign_never_signal = ["dcgmi", "/usr/bin/nv-hostengine"]\n', "jobs.foreign_never_signal[1]", 'not a path or empty; got "/usr/bin/nv-hostengine"'),
        ('[jobs]\nforeign_never_signal = [""]\n', "jobs.foreign_never_signal[0]", "must be a process name"),
        ("[reset]\ncommand = []\n", "reset.command", "must name a program: a non-empty argv list"),
        ('[reset]\ncommand = ["", "{uuid}"]\n', "reset.command", "must name a program"),
        ('[reset]\ncommand = ["reset", "{gpu}"]\n', "reset.command[1]", 'unknown placeholder {gpu} in "{gpu}"; allowed: {uuid}, {index}, {pci_bus_id}'),
        ('[reset]\ncommand = ["reset", "{}"]\n', "reset.command[1]", "unknown placeholder {}"),
        ('[reset]\ncommand = ["reset", "{uuid.hex}"]\n', "reset.command[1]", "unknown placeholder {uuid.hex}"),
        ('[reset]\ncommand = ["reset", "{uuid"]\n', "reset.command[1]", 'bad placeholder in "{uuid"'),
        ('[reset]\ncommand = ["reset", "{uuid:d}"]\n', "reset.command[1]", 'bad placeholder in "{uuid:d}"'),
    ],
)
def test_value_checks(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    exc = error(tmp_path, text)
    assert exc.key == key and fragment in exc.problem, exc.problem


def test_foreign_never_signal_defaults_to_nvidia_daemons_and_may_be_emptied(tmp_path: Path) -> None:
    assert {"nv-hostengine", "dcgm-exporter", "nvidia-persistenced"} <= set(Config().jobs.foreign_never_signal)
    assert load(write(tmp_path, "[jobs]\nforeign_never_signal = []\n")).jobs.foreign_never_signal == ()
    assert load(write(tmp_path, '[jobs]\nforeign_never_signal = ["my-agent"]\n')).jobs.foreign_never_signal == ("my-agent",)


def test_reset_placeholders_and_literal_braces_pass(tmp_path: Path) -> None:
    command = '["reset", "--id={uuid}", "{index}", "{pci_bus_id}", "{{literal}}"]'
    assert load(write(tmp_path, f"[reset]\ncommand = {command}\n")).reset.command[-1] == "{{literal}}"


# -- [[job]]

JOB = '[[job]]\nname = "{name}"\ncommand = ["python", "train.py"]\n'


def test_jobs_are_parsed_with_env_user_and_min_gpus(tmp_path: Path) -> None:
    config = load(
        write(
            tmp_path,
            '[[job]]\nname = "yolo-coco"\ncommand = ["python", "train.py", "--resume"]\nworkdir = "/srv/train"\n'
            'env = { OMP_NUM_THREADS = "8", NCCL_DEBUG = "WARN" }\nuser = "train"\ngpus = 4\nmin_gpus = 2\n'
            'checkpoint = "runs/last.pt"\nmax_restarts = 0\n'
            '[[job]]\nname = "eval.1"\ncommand = ["eval"]\ncheckpoint = "/ckpt/last.pt"\n',
        )
    )
    first, second = config.job
    assert first == JobEntry(
        name="yolo-coco",
        command=("python", "train.py", "--resume"),
        workdir=Path("/srv/train"),
        env=(("NCCL_DEBUG", "WARN"), ("OMP_NUM_THREADS", "8")),
        user="train",
        gpus=4,
        min_gpus=2,
        checkpoint=Path("runs/last.pt"),
        max_restarts=0,
    )
    assert second == JobEntry(name="eval.1", command=("eval",), checkpoint=Path("/ckpt/last.pt"))


def test_env_may_be_a_sub_table(tmp_path: Path) -> None:
    config = load(write(tmp_path, JOB.format(name="a") + '[job.env]\nB = "2"\nA = "1"\n'))
    assert config.job[0].env == (("A", "1"), ("B", "2"))


def test_duplicate_job_names(tmp_path: Path) -> None:
    exc = error(tmp_path, JOB.format(name="a") + JOB.format(name="b") + JOB.format(name="a"))
    assert (exc.key, exc.problem) == ("job[2].name", '"a" is already the name of job[0]')


@pytest.mark.parametrize(
    ("extra", "key", "fragment"),
    [
        ("gpus = 0\n", "job[0].gpus", "must be 1 or more; got 0"),
        ("min_gpus = 0\n", "job[0].min_gpus", "must be 1 or more"),
        ("gpus = 2\nmin_gpus = 3\n", "job[0].min_gpus", "must be between 1 and gpus (2); got 3"),
        ("max_restarts = -1\n", "job[0].max_restarts", "must be 0 or more"),
        ('user = ""\n', "job[0].user", "must not be empty"),
        ('checkpoint = "runs/last.pt"\n', "job[0].checkpoint", 'the relative path "runs/last.pt" needs a workdir'),
        ('env = { "A=B" = "1" }\n', "job[0].env", '"A=B" is not an environment variable name'),
        ('env = { CUDA_VISIBLE_DEVICES = "0" }\n', "job[0].env.CUDA_VISIBLE_DEVICES", "is set by gpuguard"),
        ('env = { GPUGUARD_JOB = "x" }\n', "job[0].env.GPUGUARD_JOB", "is set by gpuguard"),
    ],
)
def test_job_value_checks(tmp_path: Path, extra: str, key: str, fragment: str) -> None:
    exc = error(tmp_path, JOB.format(name="a") + extra)
    assert exc.key == key and fragment in exc.problem, exc.problem


@pytest.mark.parametrize("name", ["", "-lead", "has space", "a/b", "x" * 65, "ünï"])
def test_bad_job_names(tmp_path: Path, name: str) -> None:
    exc = error(tmp_path, JOB.format(name=name))
    assert exc.key == "job[0].name" and "is not a job name" in exc.problem


@pytest.mark.parametrize("name", ["a", "0", "yolo_v8.coco-2", "x" * 64])
def test_good_job_names(tmp_path: Path, name: str) -> None:
    assert load(write(tmp_path, JOB.format(name=name))).job[0].name == name


def test_empty_job_command(tmp_path: Path) -> None:
    exc = error(tmp_path, '[[job]]\nname = "a"\ncommand = []\n')
    assert exc.key == "job[0].command" and exc.problem.startswith("must name a program: a non-empty argv list")


# -- overrides, immutability


def test_with_overrides_replaces_only_what_is_given() -> None:
    base = Config()
    assert with_overrides(base) == base
    changed = with_overrides(base, state_dir=Path("/srv/state"), socket=Path("/tmp/s.sock"))
    assert changed.daemon == dataclasses.replace(base.daemon, state_dir=Path("/srv/state"), socket=Path("/tmp/s.sock"))
    assert with_overrides(base, socket=Path("/tmp/s.sock")).daemon.state_dir == base.daemon.state_dir


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load(write(tmp_path, JOB.format(name="a")))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.monitor.poll_interval_s = 5.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.job[0].gpus = 2  # type: ignore[misc]


# -- config.example.toml stays true to the dataclasses


def test_the_example_is_the_defaults() -> None:
    assert dataclasses.replace(load(EXAMPLE), source=None) == Config()


def test_the_example_names_every_field() -> None:
    table = tomllib.loads(EXAMPLE.read_text())
    for section in dataclasses.fields(Config):
        if section.name in ("job", "source"):
            continue
        names = {f.name for f in dataclasses.fields(getattr(Config(), section.name))}
        assert set(table[section.name]) == names, section.name


def test_the_example_job_uncommented_is_valid_and_sets_every_field(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    head, *jobs = text.split(JOB_MARKER)
    uncommented = "".join(
        "[[job]]\n" + "".join(line.removeprefix("# ") + "\n" for line in job.splitlines() if line.startswith("# "))
        for job in jobs
    )
    config = load(write(tmp_path, head + uncommented))
    assert len(config.job) == len(jobs) >= 2
    for f in dataclasses.fields(JobEntry):
        assert any(getattr(spec, f.name) != f.default for spec in config.job), f"no example [[job]] sets {f.name}"
