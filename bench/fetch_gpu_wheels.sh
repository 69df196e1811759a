#!/usr/bin/env bash
# Download, on this machine (it reaches the package registries), the wheels the GPU machine lacks,
# into .whl/ (git-ignored), for bench/gpu_check.sh to carry there: run with carry [".whl"].
# The GPU machine has Python 3.12 and PyTorch preinstalled; these are what ultralytics and
# gpuguard need beside them (about 56 MB; a carry holds 64 MiB).
# Usage: bench/fetch_gpu_wheels.sh [PYTHON_VERSION]   (default 3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.12}
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl \
    structlog==26.1.0 watchdog==7.1.0 ultralytics==8.4.190 ultralytics-thop==2.2.3 \
    ultralytics-platform==0.1.99 polars==2.1.0 polars-runtime-32
du -sh .whl
