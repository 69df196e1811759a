"""A tiny synthetic detection dataset, so demos and tests train offline.

Coloured rectangles on a grey background; the class is the colour. Layout is
the one Ultralytics expects: images/{train,val}/*.png, labels/{train,val}/*.txt
(`cls xc yc w h`, normalised) and a data.yaml whose `path` is absolute.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CLASSES = (("red", (220, 40, 40)), ("green", (40, 180, 60)), ("blue", (40, 70, 220)))


def make_dataset(root: Path, *, train: int = 16, val: int = 4, imgsz: int = 64, seed: int = 0) -> Path:
    """Write the dataset under `root` and return the absolute path of its data.yaml."""
    from PIL import Image, ImageDraw  # Pillow comes with ultralytics; only the job needs it

    if imgsz < 32:
        raise ValueError("imgsz must be at least 32 (YOLO's largest stride)")
    root = root.resolve()
    rng = random.Random(seed)
    for split, count in (("train", train), ("val", val)):
        images, labels = root / "images" / split, root / "labels" / split
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image = Image.new("RGB", (imgsz, imgsz), (128, 128, 128))
            draw = ImageDraw.Draw(image)
            lines = []
            for _ in range(rng.randint(1, 3)):
                cls = rng.randrange(len(CLASSES))
                w, h = rng.randint(imgsz // 6, imgsz // 2), rng.randint(imgsz // 6, imgsz // 2)
                x0, y0 = rng.randint(0, imgsz - w), rng.randint(0, imgsz - h)
                draw.rectangle((x0, y0, x0 + w - 1, y0 + h - 1), fill=CLASSES[cls][1])
                lines.append(f"{cls} {(x0 + w / 2) / imgsz:.6f} {(y0 + h / 2) / imgsz:.6f} {w / imgsz:.6f} {h / imgsz:.6f}")
            image.save(images / f"{split}{index:04d}.png")
            (labels / f"{split}{index:04d}.txt").write_text("\n".join(lines) + "\n")
    names = "\n".join(f"  {i}: {name}" for i, (name, _) in enumerate(CLASSES))
    data_yaml = root / "data.yaml"
    data_yaml.write_text(f"path: {json.dumps(str(root))}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return data_yaml
