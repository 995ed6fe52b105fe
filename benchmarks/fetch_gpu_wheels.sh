#!/usr/bin/env bash
# Download, here, the wheels that benchmarks/gpu_check.sh installs on the GPU machine (no registry
# reachable there) into the git-ignored folder .whl/; the device call carries it (carry=[".whl"]).
#
# That machine's python3 is CPython 3.12 (x86-64) with torch 2.11, transformers 5.17, peft, timm,
# accelerate, pandas, numpy, scipy, pyarrow, safetensors, tokenizers, pluggy, pyyaml, click, pillow,
# huggingface-hub 1.33, jinja2, psutil, xxhash, fsspec, requests, httpx (KINDS.md's package list).
# What the check imports beyond those, found by running `gpu_check.py --smoke` with exactly that
# machine's packages plus this list (everything else hidden):
#
#   pydantic (+ pydantic-core, annotated-types, typing-inspection): every config and plugin option
#   typing-extensions: pydantic 2.14 needs >= 4.16, newer than the machine may have
#   trl: the RFT trainer samples inside trl.models.unwrap_model_for_generation
#   datasets (+ dill, multiprocess): imported by trl; 4.8 asks pyarrow >= 21 and hub < 2 (the machine: 1.33)
#
# Not needed by the check (its inputs are tensors, no files are read): wfdb, which
# benchmarks/data_pipeline.py needs to read and write ECG records; `--data` adds it (its own needs,
# matplotlib, scipy, pandas, aiohttp, fsspec, requests, are on the machine; soundfile is optional:
# FLAC-compressed records only).
#
#   bash benchmarks/fetch_gpu_wheels.sh [--data]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
WHEELS=(
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0
  trl==1.16.0
  datasets==4.8.5
  dill==0.4.1
  multiprocess==0.70.19
)
if [ "${1:-}" = "--data" ]; then
  WHEELS+=(wfdb==4.3.1)
fi

# The device tool carries only ignored paths; .git/info/exclude keeps the wheels out of commits.
EXCLUDE="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >>"$EXCLUDE"

# One version of each package: two would stop the install there.
rm -rf "$DEST"
mkdir -p "$DEST"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
${PYTHON:-python3} -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${WHEELS[@]}"
ls -l "$DEST"
du -sh "$DEST"
