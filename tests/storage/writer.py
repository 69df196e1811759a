"""A job for the storage tests (run by gpuguardd, not collected by pytest): it notes what
it was resumed from in `attempts.jsonl`, writes one checkpoint holding STEP atomically to
`ck.pt` (a zip shaped like torch.save's), then sleeps until it is stopped."""

from __future__ import annotations

import io
import json
import os
import pickle
import sys
import time
import zipfile
from pathlib import Path


def checkpoint(step: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"step": step}, protocol=2))
        archive.writestr("archive/data/0", os.urandom(4096))
    return buf.getvalue()


def main() -> None:
    step = int(sys.argv[1])
    resume = os.environ.get("GPUGUARD_RESUME_FROM")
    resumed = None
    if resume:
        with zipfile.ZipFile(resume) as archive:
            resumed = pickle.loads(archive.read("archive/data.pkl"))["step"]
    with open("attempts.jsonl", "a") as out:
        out.write(json.dumps({"resume_from": resume, "resumed_step": resumed}) + "\n")
    if step:
        tmp = Path(".ck.pt.tmp")
        tmp.write_bytes(checkpoint(step))
        os.replace(tmp, "ck.pt")
    time.sleep(600)


if __name__ == "__main__":
    main()
