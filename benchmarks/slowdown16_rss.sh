#!/bin/bash
# Peak RSS and a timestamped log of `taylormlp protect smollm2-135m-instruct --slowdown 16` (run it alone; the
# release goes to a temporary directory and is deleted). Prints "<seconds> s <peak RSS> KB" as the last line.
#   bash benchmarks/slowdown16_rss.sh [LOG]        (default LOG: results/slowdown-16-protect-log.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
log="${1:-results/slowdown-16-protect-log.txt}"
out="$(mktemp -d)/release"
trap 'rm -rf "$(dirname "$out")"' EXIT
/usr/bin/time -f "%e s %M KB" .venv/bin/taylormlp protect smollm2-135m-instruct --slowdown 16 --out "$out" 2>&1 \
  | stdbuf -oL tr '\r' '\n' | grep --line-buffered -av '/s\]$\|/it\]$\|/shard\]$\|/layer\]$\|/check\]$\|/prompt\]$' \
  | while IFS= read -r line; do if [ -n "${line// }" ]; then echo "$(date +%T) $line"; fi; done > "$log"
tail -1 "$log"
