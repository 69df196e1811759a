#!/usr/bin/env bash
# The one prepared run for a GPU machine (issue #8): install gpuguard from this working tree into
# the machine's own Python without downloads, then run bench/gpu_check.py there.
#
# Ultralytics and its small dependencies are not on that machine and it has no network: carry them
# as wheels in .whl/ (make them here with bench/fetch_gpu_wheels.sh). Everything goes into a fresh
# directory of its own (pip --target), so the machine's site-packages and any gpuguard already
# installed there are left alone, and the run uses this tree's code.
#
# Usage: bench/gpu_check.sh [bench/gpu_check.py arguments]   (PYTHON: the interpreter, default python3;
#        WHEELS: the carried wheels, default .whl; OUT: where the logs and gpu_check.json go)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
site=$(mktemp -d "${TMPDIR:-/tmp}/gpuguard-site.XXXXXX")
trap 'rm -rf "$site"' EXIT
pip=("$py" -m pip install -q --no-index --no-deps --no-cache-dir --disable-pip-version-check --target "$site")
wheels=${WHEELS:-.whl}
if compgen -G "$wheels/*.whl" > /dev/null; then
    "${pip[@]}" --no-compile "$wheels"/*.whl
    echo "gpu_check.sh: installed $(ls "$wheels"/*.whl | wc -l) carried wheel(s) into $site"
fi
"${pip[@]}" --no-build-isolation .
echo "gpu_check.sh: installed gpuguard from $(pwd) into $site"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" GPUGUARD_BIN="$site/bin" PYTHONUNBUFFERED=1
"$py" bench/gpu_check.py "$@"
