#!/usr/bin/env bash
# Issue 9's GPU check, one prepared script for the `device` machine (an NVIDIA GPU):
#   protect SmolLM2 (default preset) with calibration, validation and the coverage search on CUDA,
#   compare it with the original on the held-out prompts, bench it, and time the paper preset too.
# Usage (repository root, after `make setup`): benchmarks/gpu_check.sh [OUT_DIR]   (default: $OUT or results/gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-results/gpu}}"
mkdir -p "$OUT_DIR"
BIN=.venv/bin
export TAYLORMLP_QUIET=1
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  $BIN/python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} > "$OUT_DIR/gpu-machine.txt" 2>&1
for preset in paper default; do
  /usr/bin/time -f "wall %e s, peak RSS %M KB" -o "$OUT_DIR/protect-$preset-cuda.time" \
    $BIN/taylormlp protect smollm2-135m-instruct --preset $preset --device cuda --out "releases/smollm2-$preset-cuda" --force \
    > "$OUT_DIR/protect-$preset-cuda.txt" 2>&1
done
$BIN/taylormlp compare smollm2-135m-instruct releases/smollm2-default-cuda --prompts benchmarks/prompts_smollm2.json \
  --json "$OUT_DIR/compare-smollm2-default-cuda.json" --force > "$OUT_DIR/compare-smollm2-default-cuda.txt" 2>&1
$BIN/taylormlp bench smollm2-135m-instruct releases/smollm2-default-cuda --tokens 32 --repeats 3 \
  --json "$OUT_DIR/bench-smollm2-default-cuda.json" --force > "$OUT_DIR/bench-smollm2-default-cuda.txt" 2>&1
cat "$OUT_DIR"/*.time
