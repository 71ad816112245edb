#!/usr/bin/env bash
# The GPU check (issues 17 and 19), one prepared script for the `device` machine (one NVIDIA GPU, its own python3 with
# torch and transformers; no network, so the real SmolLM2 does not travel: random-weight models with real shapes and
# SmolLM2's tokenizer, built there by benchmarks/scale.py).  Stages, each under its own time limit, each writing its
# results to OUT_DIR as it ends (a stage that fails or runs out of time leaves the ones before it intact):
#   1. machine: the GPU, torch and transformers versions.
#   2. issue 17: the SmolLM2 shape (30 layers, random bf16 weights) protected on cuda at coverage 1.0, order 8 and
#      order 13 (paper preset, one piece per channel); `taylormlp bench --device cuda --batch-sizes 1 8 32` of both
#      against the original (the measured slowdown curve), and benchmarks/gpu_prediction.py on the same releases
#      (the predicted one, to set beside it).
#   0. issue 30 (stages "compiled", "trunc"): the throttle on a compiled graph, benchmarks/compiled_decode.py: eager
#      against torch.compile with a static KV cache and CUDA graphs, at SmolLM2's shape (orders 8, 13) and at a
#      4-layer Llama-3-8B shape (order 8), batch 1, 8, 32.
#   3. issue 19: the Llama-3-8B shape at full depth (32 layers): build, `protect --device cuda` (paper preset, coverage
#      0.5, bf16, 16 calibration samples) with wall time and peak RSS, greedy generation of 16 tokens on the GPU with
#      teacher-forced agreement against the original (benchmarks/offload_generate.py), then the throughput curve.
# Usage (repository root):
#   benchmarks/gpu_check.sh [OUT_DIR]      (default: $OUT, else results/gpu)
# OUT_DIR receives two files, rewritten after every stage: gpu-check-log.txt and gpu-check.tar.gz, which holds every
# stage's output (NAME.txt) and its JSON, plots and markdown (the device tool brings back at most 8 files).
# Environment: PY (default: .venv/bin/python if it exists, else python3), DEVICE (default cuda), TOKENIZER (a directory
# with SmolLM2's tokenizer files; default .gpu/tokenizer if it exists, else the built-in model's), WORK (scratch
# directory, default .gpu-work), SMALL=1 (a dry run of every stage on tiny depths, for a CPU rehearsal),
# STAGE_LIMIT_S (seconds per stage, default 240), BUDGET_S (the whole script's seconds, default 520).
# Preparing it here:  mkdir -p .gpu && .venv/bin/python -c "from taylormlp.release.sources import resolve_source, \
#   load_tokenizer; load_tokenizer(resolve_source('smollm2-135m-instruct')).save_pretrained('.gpu/tokenizer')"
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-results/gpu}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
FINAL="$OUT_DIR"
PY="${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
DEVICE="${DEVICE:-cuda}"
WORK="${WORK:-$PWD/.gpu-work}"
STAGE_LIMIT_S="${STAGE_LIMIT_S:-240}"
BUDGET_S="${BUDGET_S:-520}"
START=$SECONDS
rm -rf "$WORK"; mkdir -p "$WORK/results"
OUT_DIR="$WORK/results"   # every stage writes here; pack() copies it to $FINAL
pack() { tar -czf "$FINAL/gpu-check.tar.gz" -C "$OUT_DIR" . && cp "$LOG" "$FINAL/gpu-check-log.txt"; }
export TAYLORMLP_QUIET=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
TOK_ARGS=()
TOKENIZER="${TOKENIZER:-$([ -d .gpu/tokenizer ] && echo .gpu/tokenizer || true)}"
[ -n "$TOKENIZER" ] && TOK_ARGS=(--tokenizer "$TOKENIZER")
if [ "${SMALL:-0}" = 1 ]; then SMOL_LAYERS=2; BIG_SHAPE=smol-wide; BIG_LAYERS=2; TRUNC_LAYERS=1; COMPILE_MODE=default
else SMOL_LAYERS=30; BIG_SHAPE=llama3-8b; BIG_LAYERS=32; TRUNC_LAYERS=4; COMPILE_MODE=reduce-overhead; fi
LOG="$OUT_DIR/gpu-check-log.txt"
: > "$LOG"
say() { echo "[$((SECONDS - START)) s] $*" | tee -a "$LOG"; }
# step NAME CMD...: run CMD under the smaller of the stage limit (LIMIT=S before it: another) and what is left of the
# budget; its output to NAME.txt
step() {
  local name=$1; shift
  local left=$((BUDGET_S - (SECONDS - START)))
  local want=${LIMIT:-$STAGE_LIMIT_S}
  local limit=$((left < want ? left : want))
  if [ "$limit" -lt 15 ]; then say "$name: skipped, ${left} s of the budget left"; return 1; fi
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.txt" 2>&1
  local rc=$?
  say "$name: exit $rc after $((SECONDS - t0)) s (limit $limit s)"
  tail -n 3 "$OUT_DIR/$name.txt" | sed 's/^/    /' | tee -a "$LOG"
  pack
  return $rc
}
# protect with its peak RSS (python's resource module: /usr/bin/time may be absent there); a command, for `timeout`
PROTECT=("$PY" -c 'import resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.call([sys.executable, "-m", "taylormlp.cli", "protect", *sys.argv[1:]])
print(f"protect: exit {rc}, wall {time.perf_counter() - t:.1f} s, "
      f"peak RSS {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6:.2f} GB")
sys.exit(rc)')

# 1. the machine
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "no nvidia-smi"
  "$PY" -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" 2>&1
  nproc; free -g | head -2; df -h "${WORK%/*}" | tail -1
} > "$OUT_DIR/gpu-machine.txt"
say "machine: $(tr '\n' ' ' < "$OUT_DIR/gpu-machine.txt")"

# issue 30: the throttle on a compiled graph (torch.compile, static KV cache, CUDA graphs: how engines decode) against
# eager, at SmolLM2's shape (orders 8 and 13) and a truncated Llama-3-8B shape (order 8), batch 1, 8, 32
for shape in compiled trunc; do
  [[ " $STAGES " == *" $shape "* ]] || continue
  if [ "$shape" = compiled ]; then S=smollm2; L=$SMOL_LAYERS; ORDERS="8 13"; else S=$BIG_SHAPE; L=$TRUNC_LAYERS; ORDERS=8; fi
  M="$WORK/$shape/model-$L"
  step "$shape-build" "$PY" benchmarks/scale.py --shape "$S" --layers "$L" --build-only --workdir "$WORK/$shape" \
    --device "$DEVICE" "${TOK_ARGS[@]}" || continue
  RELS=()
  for n in $ORDERS; do
    step "$shape-protect-n$n" "${PROTECT[@]}" "$M" --out "$WORK/$shape/rel-n$n" --preset paper --coverage 1.0 \
      --order "$n" --dtype bfloat16 --calibration-samples 16 --device "$DEVICE" && RELS+=("$WORK/$shape/rel-n$n")
  done
  [ ${#RELS[@]} -gt 0 ] && LIMIT=$((2 * STAGE_LIMIT_S)) step "$shape-decode" "$PY" benchmarks/compiled_decode.py "$M" \
    "${RELS[@]}" --device "$DEVICE" --mode "$COMPILE_MODE" --batch-sizes 1 8 32 --tokens 32 --repeats 3 \
    --json "$OUT_DIR/gpu-compiled-$S-$L.json" --md "$OUT_DIR/gpu-compiled-$S-$L.md"
  rm -rf "$WORK/$shape"
done

# the suite's GPU tests (a streamed protect on cuda against the original; placement on cuda devices), tiny models
STAGES="${STAGES:-compiled trunc tests smol big}"   # which of the stages below to run (in their order below)
[[ " $STAGES " == *" tests "* ]] && TAYLORMLP_TEST_TOKENIZER="${TOKENIZER:-}" step cuda-tests "$PY" -m pytest -q -p no:cacheprovider -m "not slow" \
  tests/test_stream.py tests/test_offload.py

# 2. issue 17: the slowdown curve on the SmolLM2 shape, measured and predicted
SMOL="$WORK/smol/model-$SMOL_LAYERS"
if [[ " $STAGES " == *" smol "* ]] && step smol-build "$PY" benchmarks/scale.py --shape smollm2 --layers "$SMOL_LAYERS" --build-only --workdir "$WORK/smol" \
     "${TOK_ARGS[@]}"; then
  if ! step smol-protect-n8 "${PROTECT[@]}" "$SMOL" --out "$WORK/smol/rel-n8" --preset paper --coverage 1.0 --order 8 \
    --dtype bfloat16 --calibration-samples 16 --device "$DEVICE"; then
    say "protect on $DEVICE failed: nothing after it can run"; exit 1
  fi
  step smol-protect-n13 "${PROTECT[@]}" "$SMOL" --out "$WORK/smol/rel-n13" --preset paper --coverage 1.0 --order 13 \
    --dtype bfloat16 --calibration-samples 16 --device "$DEVICE"
  step smol-bench "$PY" -m taylormlp.cli bench "$SMOL" "$WORK/smol/rel-n8" "$WORK/smol/rel-n13" --device "$DEVICE" \
    --batch-sizes 1 8 32 --tokens 32 --repeats 3 --json "$OUT_DIR/gpu-bench-smollm2-shape.json" \
    --plot "$OUT_DIR/gpu-bench-smollm2-shape.png" --force
  step smol-predict "$PY" benchmarks/gpu_prediction.py "$SMOL" "$WORK/smol/rel-n8" "$WORK/smol/rel-n13" \
    --out "$OUT_DIR/gpu-prediction-smollm2-shape.md" --force
fi
rm -rf "$WORK/smol"; pack

# 3. issue 19: the Llama-3-8B shape at full depth
BIG="$WORK/big/model-$BIG_LAYERS"
if [[ " $STAGES " == *" big "* ]] && step big-build "$PY" benchmarks/scale.py --shape "$BIG_SHAPE" --layers "$BIG_LAYERS" --build-only --workdir "$WORK/big" \
     --device "$DEVICE" "${TOK_ARGS[@]}"; then
  if LIMIT=300 step big-protect "${PROTECT[@]}" "$BIG" --out "$WORK/big/rel" --preset paper --coverage 0.5 --dtype bfloat16 \
       --calibration-samples 16 --device "$DEVICE"; then
    du -sb "$BIG" "$WORK/big/rel" > "$OUT_DIR/big-sizes.txt"
    step big-bench "$PY" -m taylormlp.cli bench "$BIG" "$WORK/big/rel" --device "$DEVICE" --batch-sizes 1 8 32 \
      --tokens 16 --repeats 2 --json "$OUT_DIR/gpu-bench-llama3-8b-shape.json" --force
    MEM=(cpu=64GiB); [ "$DEVICE" = cuda ] && MEM=(0=100GiB cpu=64GiB)
    step big-generate "$PY" benchmarks/offload_generate.py "$BIG" "$WORK/big/rel" --max-memory "${MEM[@]}" \
      --offload-folder "$WORK/big/offload" --tokens 16 --json "$OUT_DIR/gpu-generate-llama3-8b-shape.json"
  fi
fi
rm -rf "$WORK/big"
say "done in $((SECONDS - START)) s"
pack
