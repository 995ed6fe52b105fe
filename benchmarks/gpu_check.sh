#!/usr/bin/env bash
# Paper-shape GPU check on one H200, under 8 minutes: PT and SFT tokens/s, approximate MFU and peak
# memory; RFT step time and rollout tokens/s (G=8, 600 new tokens); KV cache vs recompute on the
# LLaMA-3.2-1B-shaped model. Prints one markdown table (benchmarks/gpu_check.py); with $OUT set (the
# device tool's output folder) it also writes $OUT/gpu_check.md, $OUT/gpu_check.json and the log.
#
#   here, once:   bash benchmarks/fetch_gpu_wheels.sh       # wheels into the ignored folder .whl/
#   device tool:  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
#   options pass through to gpu_check.py, e.g.  bash benchmarks/gpu_check.sh --gradient-checkpointing
#
# The machine has no registry: the carried wheels (.whl/, or $WHEEL_DIR) are installed with
# --no-index into a target folder that goes first on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${MEDTVT_SITE:-/tmp/site}
WHEELS=${WHEEL_DIR:-.whl}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    || { echo "gpu_check.sh: installing the carried wheels failed" >&2; exit 1; }
fi
# medtvt itself from this tree (no network, the machine's setuptools), so the built-in plugins register
# through their entry points as after any install. Should that fail, the source tree on PYTHONPATH
# serves instead and benchlib.plugin_catalog registers the same plugin modules by hand.
# Built from a copy: an in-tree build would leave build/ and egg-info files in the checkout.
SRC=$(mktemp -d)
cp -r pyproject.toml README.md medtvt_core plugins cli "$SRC"/
$PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
  --target "$SITE" "$SRC" >/dev/null 2>&1 || echo "gpu_check.sh: medtvt not installed; using the source tree" >&2
rm -rf "$SRC"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"

LOG=/dev/null
ARGS=()
if [ -n "${OUT:-}" ]; then
  LOG="$OUT/gpu_check.log"
  ARGS=(--out "$OUT/gpu_check.md")
fi
# A hard cap on top of the per-part budgets; the table file is rewritten after each part, so a
# stopped run still returns what it measured.
timeout -k 10 "${GPU_CHECK_TIMEOUT:-450}" $PY benchmarks/gpu_check.py ${ARGS[@]+"${ARGS[@]}"} "$@" 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
