"""gpuguard-yolo as a warm standby: do everything that needs no GPU, then wait.

gpuguard starts the next attempt of a `standby` job early, with
`GPUGUARD_STANDBY=1` and `CUDA_VISIBLE_DEVICES=""` (docs/STANDBY.md). Most of a
resumed YOLO attempt's start-up is imports and building Python objects, none
of which needs a GPU, so a standby does it ahead: ultralytics and torch, the
trainer's own modules (imported lazily by `train()` otherwise), the dataset
check and the model built once on the CPU. Then `wait_until_started()` blocks
until gpuguard hands over the GPUs and the resume path; training begins from
there as in any attempt.

Nothing here may touch CUDA (`torch.cuda.is_available()` included: it starts
the CUDA driver, which then never sees the GPUs set later); gpuguard.job
refuses a hand-over after CUDA was initialised.
"""

from __future__ import annotations

import importlib
import logging
import resource
import time
from pathlib import Path
from typing import Any

from gpuguard.job import in_standby, wait_until_started

log = logging.getLogger("gpuguard.yolo")
READY = "standby ready"  # the log line a waiting standby writes (bench/standby.py looks for it)


def prepare(overrides: dict[str, Any]) -> None:
    """In a standby: build what needs no GPU, then wait for the hand-over. Elsewhere: nothing."""
    if not in_standby():
        return
    started = time.monotonic()
    warm(overrides)
    log.info("%s in %.2f s (max RSS %d MB); waiting to be handed the GPUs", READY, time.monotonic() - started, max_rss_mb())
    told = wait_until_started()
    log.info("standby handed GPUs %s as attempt %s", told.get("CUDA_VISIBLE_DEVICES"), told.get("GPUGUARD_ATTEMPT"))


# What a resumed attempt's train() imports on its way to the first batch, measured with
# sys.modules before and after (ultralytics 8.4.190, torch 2.14.1): seconds on 2 cores.
AHEAD = (
    "torch._inductor.config",  # torch.use_deterministic_algorithms in init_seeds: dynamo, sympy
    "torchvision",
    "torch.onnx",
    "thop",
    "PIL.ImageEnhance",
    "PIL.ImageFilter",
    "PIL.ImageStat",
    "xml.etree.ElementTree",
    "html.parser",
    "ultralytics.models.yolo.detect",  # the trainer, the validator and what they import
    "ultralytics.utils.events",
    *(f"ultralytics.utils.callbacks.{name}" for name in ("clearml", "comet", "dvc", "mlflow", "platform", "raytune")),
)


def warm(overrides: dict[str, Any]) -> None:
    """Import the training path and build the model on the CPU; every step is optional
    (a failure is left to the real start, which reports it)."""
    for name in AHEAD:
        try:
            importlib.import_module(name)
        except Exception as exc:  # not installed, or not importable here: the attempt imports what it needs
            log.debug("standby: %s not imported ahead: %s", name, exc)
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.nn.tasks import DetectionModel

    data = overrides.get("data")
    try:
        names = check_det_dataset(str(data))["names"] if data and Path(str(data)).is_file() else None
        model = str(overrides.get("model") or "")
        if names is not None and Path(model).suffix in (".yaml", ".yml"):
            DetectionModel(model, nc=len(names), verbose=False)
    except Exception as exc:  # the attempt itself will meet it and say so
        log.info("standby: could not prepare everything ahead (%s)", exc)


def max_rss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
