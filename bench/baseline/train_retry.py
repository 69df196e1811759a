"""The common train_retry.py pattern: resume from last.pt when it exists, else start.

    train_retry.py DATA_YAML PROJECT NAME EPOCHS

Ultralytics saves last.pt once per epoch; nothing else is checkpointed and
nothing watches the GPU. A crash loses the batches since the last epoch end;
the retry loop (retry_loop.sh) starts this script again. Offline set-up is
borrowed from gpuguard-yolo (no network here); the training itself is stock.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batchlog import attach  # noqa: E402  (bench-only: one line per batch, the same for both)


def main(argv: list[str]) -> int:
    data, project, name, epochs = argv
    from gpuguard.integrations.ultralytics import setup_offline

    setup_offline({"project": project})
    from ultralytics import YOLO

    last = Path(project) / name / "weights" / "last.pt"
    if last.exists():
        model = YOLO(str(last))
        attach(model)
        model.train(resume=True, device="cpu", amp=False)
    else:
        model = YOLO("yolov8n.yaml")
        attach(model)
        model.train(data=data, project=project, name=name, epochs=int(epochs), imgsz=64, batch=8,
                    workers=0, plots=False, device="cpu", amp=False)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
