"""`gpuguard-yolo`: `yolo train` under gpuguard, offline.

    gpuguard-yolo train [--save-every-s S] [--copy-budget 0.01] model=yolov8n.yaml data=/abs/data.yaml epochs=10 ...
    gpuguard-yolo make-dataset DIR [--train 16 --val 4 --imgsz 64]

`train` takes the same KEY=VALUE arguments as `yolo train` and adds what a
job managed by gpuguard needs (see guard.py): checkpoint-and-exit-75 on the
checkpoint signal, a heartbeat, atomic checkpoint writes, a host copy of
the training state within --copy-budget of step time, written by a
background thread every --save-every-s seconds (by default as often as 0.5 %
of the time writing allows, 30 to 600 s; with the copy's 1 %, within 2 %
as measured in docs/BENCHMARKS.md) and when the trainer is stuck on
the signal, resume from GPUGUARD_RESUME_FROM (mid-epoch: the rest of the
epoch, in the same order, with the exact training and random states). Exit codes: 0 trained
(or nothing left to train), 75 checkpoint saved (restart me), 2 bad
arguments, 1 anything else.

Environment is set up before ultralytics is imported, because ultralytics
reads it at import time (offline mode, config dir).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import sys
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import Any

from gpuguard.integrations import standby
from gpuguard.integrations.dataset import make_dataset
from gpuguard.integrations.guard import TrainerGuard
from gpuguard.integrations.hostcopy import BUDGET
from gpuguard.integrations.rescue import SAVE_MAX_S, SAVE_MIN_S, SAVE_SHARE
from gpuguard.integrations.resume import ResumePoint, SharedLoad, read_resume_point

log = logging.getLogger("gpuguard.yolo")

EX_USAGE = 2
FONTS = ("Arial.ttf", "Arial.Unicode.ttf")


class UsageError(Exception):
    """Bad command line: reported in one line, exit 2."""


def split_args(tokens: Sequence[str]) -> dict[str, str | bool]:
    """KEY=VALUE tokens (values still strings) and bare KEY flags (True), as `yolo` reads them."""
    raw: dict[str, str | bool] = {}
    for token in tokens:
        token = token.removeprefix("--").rstrip(",")
        key, sep, value = token.partition("=")
        key, value = key.strip(), value.strip()
        if not key or (sep and not value):
            raise UsageError(f"bad argument {token!r}: expected KEY=VALUE")
        raw[key] = value if sep else True
    return raw


def setup_offline(raw: dict[str, str | bool], env: MutableMapping[str, str] = os.environ) -> Path:
    """Make ultralytics run with no network: no hub, no update checks, no font download.

    Returns the config dir. Must run before the first `import ultralytics`.
    """
    env["YOLO_OFFLINE"] = "1"
    env["YOLO_AUTOINSTALL"] = "false"
    if not env.get("YOLO_CONFIG_DIR"):
        project = raw.get("project")
        if isinstance(project, str) and Path(project).is_absolute():
            env["YOLO_CONFIG_DIR"] = str(Path(project) / ".yolo-config")
        else:
            cache = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
            env["YOLO_CONFIG_DIR"] = str(Path(cache) / "gpuguard-yolo")
    fonts = Path(env["YOLO_CONFIG_DIR"]) / "Ultralytics"
    fonts.mkdir(parents=True, exist_ok=True)
    source = _dejavu_sans()
    for name in FONTS:
        if not (fonts / name).exists() and source is not None:
            shutil.copyfile(source, fonts / name)  # the font check would otherwise ask GitHub
    return Path(env["YOLO_CONFIG_DIR"])


def _dejavu_sans() -> Path | None:
    spec = importlib.util.find_spec("matplotlib")
    for base in (spec.submodule_search_locations or []) if spec else []:
        font = Path(base) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if font.exists():
            return font
    return None


def convert_args(raw: dict[str, str | bool]) -> dict[str, Any]:
    """Typed overrides, checked against Ultralytics' own argument list."""
    from ultralytics.cfg import DEFAULT_CFG_DICT, check_dict_alignment, parse_key_value_pair

    overrides: dict[str, Any] = {}
    for key, value in raw.items():
        if value is True:
            if not isinstance(DEFAULT_CFG_DICT.get(key), bool):
                raise UsageError(f"{key!r} needs a value: {key}=...")
            overrides[key] = True
        else:
            overrides[key] = parse_key_value_pair(f"{key}={value}")[1]
    overrides.pop("mode", None)
    try:
        check_dict_alignment(DEFAULT_CFG_DICT, overrides)
    except SyntaxError as exc:
        raise UsageError(str(exc).strip().splitlines()[0]) from None
    return overrides


def check_local(overrides: dict[str, Any]) -> None:
    """Refuse what a fresh run would download; make data= absolute."""
    model = str(overrides.get("model") or "yolo26n.pt")
    if Path(model).suffix not in (".yaml", ".yml") and not Path(model).is_file():
        raise UsageError(
            f"model={model} is not a local file and would be downloaded; pass a model config "
            "(e.g. model=yolov8n.yaml) or the path of a local .pt"
        )
    if "cfg" in overrides:
        return  # data may come from the cfg file; ultralytics checks it
    data = overrides.get("data")
    if not data:
        raise UsageError("data= is required (the default dataset would be downloaded)")
    if not Path(str(data)).is_file():
        raise UsageError(f"data={data} is not a local file (a dataset name would be downloaded)")
    overrides["data"] = str(Path(str(data)).resolve())


def choose_device(overrides: dict[str, Any]) -> str:
    """The user's device= if given, else every GPU CUDA_VISIBLE_DEVICES shows, else the CPU."""
    if overrides.get("device") not in (None, ""):
        return str(overrides["device"])
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return ",".join(str(i) for i in range(torch.cuda.device_count()))
    return "cpu"


def resume_kwargs(point: ResumePoint, overrides: dict[str, Any], device: str) -> dict[str, Any]:
    """train() arguments that continue `point`'s run in its original save_dir."""
    user = {k: v for k, v in overrides.items() if k not in ("model", "resume")}
    data = user.pop("data", None) or point.train_args.get("data")
    if data and Path(str(data)).is_file():
        data = str(Path(str(data)).resolve())
    common = {"device": device, "data": data, "save_dir": str(point.save_dir)}
    if point.completed_epochs >= 1:
        return {**user, **common, "resume": str(point.path)}
    # Interrupted during the first epoch: Ultralytics cannot resume "no epoch done", so start
    # the run again from its partly trained weights, into the same directory (the guard then
    # loads the checkpoint's optimizer, scaler and EMA state, and skips the batches trained).
    base = {k: v for k, v in point.train_args.items() if k not in ("model", "resume")}
    return {**base, **user, **common, "resume": False, "pretrained": True, "exist_ok": True}


def train(tokens: Sequence[str], save_every_s: float | None = None, copy_budget: float = BUDGET) -> int:
    """The `train` command; see the module docstring for exit codes."""
    if save_every_s is not None and not save_every_s >= 0:
        raise UsageError(f"--save-every-s must be 0 (off) or more, not {save_every_s}")
    if not copy_budget > 0:
        raise UsageError(f"--copy-budget must be more than 0, not {copy_budget}")
    try:
        guard = TrainerGuard.from_env()
    except ValueError as exc:
        raise UsageError(f"GPUGUARD_CHECKPOINT_SIGNAL: {exc}") from None
    guard.save_every_s = save_every_s
    guard.copy_budget = copy_budget
    guard.listen()  # first: a checkpoint request during start-up is kept for the first batch end
    raw = split_args(tokens)
    setup_offline(raw)
    from ultralytics import YOLO

    overrides = convert_args(raw)
    standby.prepare(overrides)  # a warm standby builds what needs no GPU and waits here for its GPUs
    device = choose_device(overrides)
    resume_from = os.environ.get("GPUGUARD_RESUME_FROM")
    shared: SharedLoad | None = None
    if resume_from:
        try:
            point = read_resume_point(Path(resume_from))
        except Exception as exc:  # a file gpuguard validated as a zip may still not be a checkpoint
            log.error("cannot resume from %s: %s", resume_from, exc)
            return 1
        if point.finished:
            log.info("training already complete (%s: %d/%d epochs); nothing to resume", point.path, point.epochs, point.epochs)
            return 0
        log.info(
            "resuming %s from %s: %d/%d epochs done, attempt %s",
            point.save_dir, point.path, point.completed_epochs, point.epochs, os.environ.get("GPUGUARD_ATTEMPT", "?"),
        )
        shared = loads = SharedLoad(point)  # one unpickling of the checkpoint instead of four
        model = YOLO(str(point.path))
        model.add_callback("on_train_start", lambda trainer: _loaded_once(loads))
        kwargs = resume_kwargs(point, overrides, device)
        guard.resume_position = point.position
        guard.resume_state = point.state
        if point.completed_epochs == 0:
            guard.first_epoch_state = point.path
        del point  # the loaded checkpoint is `shared`'s until training starts, then freed
    else:
        check_local(overrides)
        model = YOLO(str(overrides.get("model") or "yolo26n.pt"), task=overrides.get("task"))
        kwargs = {**overrides, "device": device}
    if device == "cpu" and "amp" not in overrides:
        kwargs["amp"] = False  # AMP is GPU-only, and its check downloads a model
    guard.install(model)
    try:
        model.train(**kwargs)
    finally:
        if shared is not None:
            shared.close()
    return 0


def _loaded_once(shared: SharedLoad) -> None:
    shared.close()
    log.info("the checkpoint was unpickled once; Ultralytics' %d other load(s) of it answered from memory", shared.served)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpuguard-yolo", description="Ultralytics YOLO training under gpuguard")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("train", help="yolo train KEY=VALUE ... with gpuguard's checkpoint handshake")
    run.add_argument(
        "--save-every-s", type=float, default=None, metavar="SECONDS",
        help=f"also checkpoint mid-epoch this often, for faults the trainer cannot answer (default: {SAVE_SHARE * 100:g} %% "
        f"of the time writing, every {SAVE_MIN_S:g} to {SAVE_MAX_S:g} s; 0: off)",
    )
    run.add_argument(
        "--copy-budget", type=float, default=BUDGET, metavar="FRACTION",
        help=f"share of step time the host copy of the training state may cost (default {BUDGET:g}; inf: every step)",
    )
    run.add_argument("args", nargs=argparse.REMAINDER, help="KEY=VALUE arguments of `yolo train`")
    data = sub.add_parser("make-dataset", help="write a tiny synthetic detection dataset")
    data.add_argument("dir", type=Path)
    data.add_argument("--train", type=int, default=16, help="training images (default 16)")
    data.add_argument("--val", type=int, default=4, help="validation images (default 4)")
    data.add_argument("--imgsz", type=int, default=64, help="image size in pixels (default 64)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("gpuguard-yolo: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        if args.command == "make-dataset":
            if args.imgsz < 32 or args.train < 1 or args.val < 1:
                raise UsageError("need --imgsz >= 32 and at least one train and one val image")
            print(make_dataset(args.dir, train=args.train, val=args.val, imgsz=args.imgsz))
            return 0
        return train(args.args, args.save_every_s, args.copy_budget)
    except UsageError as exc:
        log.error("error: %s", exc)
        return EX_USAGE


if __name__ == "__main__":
    sys.exit(main())
