#!/usr/bin/env bash
# Issue 9's GPU check, one prepared script for the `device` machine (an NVIDIA GPU):
#   protect SmolLM2 (default preset) with calibration, validation and the coverage search on CUDA,
#   compare it with the original on the held-out prompts, bench it on the GPU at batch 1, 8 and 32 (the slowdown
#   curve, issue 17) beside its predicted curve, and time the paper preset too.
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
# issue 17: the slowdown curve on the GPU (throughput ratio at batch 1, 8 and 32, one interleaved run, timed on cuda),
# and next to it the curve taylormlp.predict predicts for this release from its counted work (results/gpu-prediction.md)
$BIN/taylormlp bench smollm2-135m-instruct releases/smollm2-default-cuda --device cuda --batch-sizes 1 8 32 \
  --tokens 32 --repeats 3 --json "$OUT_DIR/bench-smollm2-default-cuda.json" \
  --plot "$OUT_DIR/bench-batch-smollm2-default-cuda.png" --force > "$OUT_DIR/bench-smollm2-default-cuda.txt" 2>&1
$BIN/python benchmarks/gpu_prediction.py smollm2-135m-instruct releases/smollm2-default-cuda \
  --out "$OUT_DIR/gpu-prediction-default-cuda.md" --force > /dev/null 2> "$OUT_DIR/gpu-prediction-default-cuda.log"
cat "$OUT_DIR"/*.time
