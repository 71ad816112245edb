#!/bin/bash
# Issue 10's acceptance pair with the code as it is now: protect SmolLM2 at --slowdown 1.5 and 8 (each timed, peak
# RSS), a plain default protect for the cost comparison, then `taylormlp bench` (both releases interleaved with the
# original in one run) and `taylormlp compare` on the 20 held-out prompts (64 tokens). Run it alone: timings.
#   bash benchmarks/slowdown_pair.sh [OUT]      (releases under OUT, default releases/pair; ~10 GB of disk)
# Writes results/slowdown-pair-log.txt (timestamped), results/bench-slowdown-pair.json,
# results/compare-slowdown-pair-{1.5,8}.json (RESULTS=DIR: under DIR instead of results/).
set -euo pipefail
cd "$(dirname "$0")/.."
T=.venv/bin/taylormlp
out="${1:-releases/pair}"
res="${RESULTS:-results}"
log="$res/slowdown-pair-log.txt"
mkdir -p "$out" "$res"
stamp() { stdbuf -oL tr '\r' '\n' | grep --line-buffered -av '/s\]$\|/it\]$\|/shard\]$\|/layer\]$\|/check\]$\|/prompt\]$\|/batch\]$' \
  | while IFS= read -r line; do if [ -n "${line// }" ]; then echo "$(date +%T) $line"; fi; done; }
{
  echo "commit $(git rev-parse --short HEAD)"
  for x in 1.5 8; do
    /usr/bin/time -f "protect --slowdown $x: %e s, peak RSS %M KB" \
      $T protect smollm2-135m-instruct --slowdown "$x" --out "$out/slowdown-$x" --force 2>&1
  done
  /usr/bin/time -f "protect (default preset): %e s, peak RSS %M KB" \
    $T protect smollm2-135m-instruct --out "$out/default" --force 2>&1
  rm -rf "$out/default"
  $T bench smollm2-135m-instruct "$out/slowdown-1.5" "$out/slowdown-8" --tokens 32 --repeats 3 \
    --json "$res/bench-slowdown-pair.json" --force 2>&1
  for x in 1.5 8; do
    $T compare smollm2-135m-instruct "$out/slowdown-$x" --prompts benchmarks/prompts_smollm2.json \
      --json "$res/compare-slowdown-pair-$x.json" --force 2>&1
  done
} | stamp > "$log"
grep -a "protect --slowdown\|protect (default\|measured decode\|identical greedy\|^[0-9:]* slowdown-" "$log"
