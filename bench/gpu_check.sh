#!/usr/bin/env bash
# The pretraining command on one accelerator: smollm_360m and mor_360m, STEPS steps each
# with the configs' own settings (bf16, remat, the paper's global batch; micro-batch and
# accumulation planned from the device's memory), then a summary of tokens/s, MFU, step
# time and peak memory (bench/gpu_check.py -> OUT/gpu_check.json and OUT/gpu_check.md).
# No network needed: the data is pycorpus (the Python standard library's sources) with the
# byte tokenizer.
#
#   bench/gpu_check.sh                       # on the GPU machine
#   STEPS=15 bench/gpu_check.sh --config.train.micro_batch_per_device=16   # skip the search
#   bench/gpu_check.sh --tiny                # CPU smoke: vanilla_tiny and mor_tiny, 6 steps
#
# Extra arguments go to every launch.main call. Env: STEPS (default 30), OUT (default
# gpu_check), PYTHON (default python).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-gpu_check}
CONFIGS="configs/smollm_360m.py configs/mor_360m.py"
STEPS=${STEPS:-30}
LOG_EVERY=5
if [[ "${1:-}" == "--tiny" ]]; then
  shift
  CONFIGS="configs/vanilla_tiny.py configs/mor_tiny.py"
  STEPS=6
  LOG_EVERY=2
  set -- --config.data.max_docs=200 --config.train.grad_accum=0 "$@"
fi
mkdir -p "$OUT"
RUNS=()
for config in $CONFIGS; do
  name=$(basename "$config" .py)
  rm -rf "${OUT:?}/$name"
  echo "== $name: $STEPS steps"
  PYTHONPATH=. "$PYTHON" -m launch.main --config="$config" --workdir="$OUT/$name" \
    --config.train.steps="$STEPS" --config.train.log_every="$LOG_EVERY" \
    --config.train.eval_every=0 --config.train.checkpoint_every=1000000 \
    --config.train.tensorboard=False --config.train.report_unigram_entropy=False \
    --config.sample.max_new_tokens=0 "$@" 2>&1 | tee "$OUT/$name.log"
  RUNS+=("$OUT/$name")
done
PYTHONPATH=. "$PYTHON" bench/gpu_check.py --out="$OUT" "${RUNS[@]}"
