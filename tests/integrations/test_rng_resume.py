"""A resumed run is the same run: the tiny YOLO trained three ways ends with equal weights.

Uninterrupted; interrupted while the trainer answers (checkpoint at a batch
end); interrupted while its main thread is stuck in a blocking call (the
rescue thread writes the host copy). All on the CPU with Ultralytics'
`deterministic=True`; Ultralytics itself uses no loader workers on the CPU
(`workers=0`), so every random draw happens in the process and is captured.
`nbs=16` with `batch=8`: warm-up ramps gradient accumulation from 1 to 2
batches a step, so steps come after batches 1, 2, 4, 6 and 8 (counted over
both epochs), and the answered interruption (after batch 3) carries
accumulated gradients; the resumed processes keep that cadence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .yolo_runs import EX_TEMPFAIL, EXACT_ARGS, EXACT_FLAGS, EXACT_SHIM, INTERRUPTIONS, Job, trained_per_epoch



@dataclass
class Runs:
    uninterrupted: Path
    interrupted: Path
    logs: list[str]
    codes: list[int]
    trained: Path
    images: list[str]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data_yaml: Path, base_env: dict[str, str]) -> Runs:
    root = tmp_path_factory.mktemp("rng")
    shim = root / "shim.py"
    shim.write_text(EXACT_SHIM)
    straight = Job(root / "straight", data_yaml, base_env)
    straight.root.mkdir()
    rc, log = straight.finish(straight.start(1, script=shim, extra_args=EXACT_ARGS, FINAL_STATE=str(root / "straight.pt")))
    assert rc == 0, log

    job = Job(root / "interrupted", data_yaml, base_env)
    job.root.mkdir()
    trained = root / "trained.jsonl"
    env = {"FINAL_STATE": str(root / "interrupted.pt"), "TRAINED_LOG": str(trained)}
    codes, logs = [], []
    for attempt, hook in enumerate(INTERRUPTIONS, 1):
        resume = job.root / f"snapshot-{attempt - 1}.pt" if attempt > 1 else None
        rc, log = job.finish(job.start(attempt, resume_from=resume, script=shim, flags=EXACT_FLAGS, extra_args=EXACT_ARGS, **env, **hook))
        codes.append(rc)
        logs.append(log)
        if rc == EX_TEMPFAIL:  # gpuguard resumes from a validated copy of the file the job named
            named = Path(job.checkpoint_file.read_text().strip())
            (job.root / f"snapshot-{attempt}.pt").write_bytes(named.read_bytes())
    images = sorted(p.name for p in (data_yaml.parent / "images" / "train").iterdir())
    return Runs(root / "straight.pt", root / "interrupted.pt", logs, codes, trained, images)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(900)  # the module's four training runs (its fixture) count here: minutes on a loaded machine
def test_interrupted_twice_ends_with_the_uninterrupted_weights_tensor_for_tensor(runs: Runs) -> None:
    import torch

    assert runs.codes == [EX_TEMPFAIL, EX_TEMPFAIL, 0], "\n".join(runs.logs)
    assert "checkpoint at epoch 1/2 batch 3/4" in runs.logs[0]
    assert "main thread stuck" in runs.logs[1]
    assert "resumed with the exact training state" in runs.logs[1] + runs.logs[2]
    straight, interrupted = (torch.load(p, map_location="cpu", weights_only=False) for p in (runs.uninterrupted, runs.interrupted))
    for part in ("model", "ema"):
        assert straight[part].keys() == interrupted[part].keys()
        unequal = [k for k in straight[part] if not torch.equal(straight[part][k], interrupted[part][k])]
        assert not unequal, f"{part}: {len(unequal)} of {len(straight[part])} tensors differ, first {unequal[:3]}"
    assert _flat(straight["optimizer"]["state"]) and _equal(straight["optimizer"], interrupted["optimizer"])


@pytest.mark.e2e
@pytest.mark.slow
def test_the_resumed_attempts_train_exactly_what_was_left(runs: Runs) -> None:
    """Every image once per epoch across the three attempts; the stuck batch, never stepped, is trained by the resume."""
    batches, per_epoch = trained_per_epoch(runs.trained)
    assert batches == 8  # the batch in flight when the main thread got stuck never reached its end
    assert {epoch: sorted(names) for epoch, names in per_epoch.items()} == {0: runs.images, 1: runs.images}


def _flat(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [x for k in sorted(value, key=str) for x in [k, *_flat(value[k])]]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flat(v)]
    return [value]


def _equal(a: Any, b: Any) -> bool:
    import torch

    fa, fb = _flat(a), _flat(b)
    return len(fa) == len(fb) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(fa, fb)
    )
