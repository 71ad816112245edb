#!/usr/bin/env bash
# Issue 11 check: a release evaluates with EleutherAI's lm-evaluation-harness exactly like its original.
# Runs `lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True` (stock transformers loads the
# release through its modeling_taylormlp.py) on the original and on the release with a LOCAL task:
# word perplexity (loglikelihood_rolling) over the licence texts in benchmarks/lm_eval_tasks/ (nothing is
# downloaded), and prints both numbers and their relative difference; exit 1 above MAX_REL_DIFF (default 0.001).
#
# usage: benchmarks/lm_eval_check.sh ORIGINAL RELEASE_DIR [LIMIT]
#   ORIGINAL     the original model: a Hugging Face model directory (or a taylormlp built-in name such as
#                smollm2-135m-instruct, resolved to its cached directory)
#   RELEASE_DIR  a taylormlp release directory
#   LIMIT        optional: evaluate only the first LIMIT documents (lm_eval --limit)
# env: LM_EVAL_DEVICE (default cpu), MAX_REL_DIFF (default 0.001 = 0.1%)
# lm-eval itself is the optional extra `eval` (pyproject.toml); it is installed into .venv on first use
# (`make eval-setup` does the same).
set -euo pipefail
if [ $# -lt 2 ] || [ $# -gt 3 ]; then
  echo "usage: $0 ORIGINAL RELEASE_DIR [LIMIT]" >&2; exit 2
fi
here=$(cd "$(dirname "$0")/.." && pwd)
py="$here/.venv/bin/python"
if [ ! -x "$py" ]; then echo "error: $here/.venv is missing; run \`make setup\` first" >&2; exit 2; fi
if ! "$py" -c "import lm_eval" 2>/dev/null; then
  echo "lm-eval is not installed in .venv; installing the optional extra taylormlp[eval] ..." >&2
  "$here/.venv/bin/pip" install -q -e "$here[eval]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$py" -c "import lm_eval" || { echo "error: installing lm-eval failed; try \`make eval-setup\`" >&2; exit 2; }
fi
original=$("$py" - "$1" <<'PY'
import sys
from taylormlp.common.errors import TaylorMLPError
from taylormlp.release.sources import resolve_source
try:
    print(resolve_source(sys.argv[1]).resolve())
except TaylorMLPError as exc:
    sys.exit(f"error: {exc}")
PY
) || exit 2
if [ ! -f "$2/taylormlp_manifest.json" ]; then
  echo "error: $2 is not a complete taylormlp release (no taylormlp_manifest.json)" >&2; exit 2
fi
release=$(cd "$2" && pwd)
limit=()
if [ $# -eq 3 ]; then limit=(--limit "$3"); fi
device=${LM_EVAL_DEVICE:-cpu}
task=taylormlp_license_ppl
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

run() {  # run NAME DIR: one lm_eval run, results JSON under $work/NAME
  local cmd=("$here/.venv/bin/lm_eval" --model hf --model_args "pretrained=$2,trust_remote_code=True"
             --tasks "$task" --include_path "$here/benchmarks/lm_eval_tasks" --device "$device" --batch_size 1
             "${limit[@]}" --output_path "$work/$1")
  echo "\$ ${cmd[*]}"
  local start=$SECONDS
  "${cmd[@]}" > "$work/$1.log" 2>&1 || { tail -30 "$work/$1.log" >&2; echo "error: lm_eval failed on $2" >&2; exit 2; }
  echo "  ($((SECONDS - start)) s)"
}

echo "lm-eval $("$py" -c 'import importlib.metadata as m; print(m.version("lm_eval"))'), transformers $("$py" -c 'import transformers; print(transformers.__version__)'), torch $("$py" -c 'import torch; print(torch.__version__)'), device $device"
run original "$original"
run release "$release"
"$py" - "$work" "$task" "${MAX_REL_DIFF:-0.001}" "$original" "$release" <<'PY'
import json, sys
from pathlib import Path

work, task, bound = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
names = {"original": sys.argv[4], "release": sys.argv[5]}

def metrics(name):
    files = sorted((work / name).rglob("results*.json"))
    if not files:
        sys.exit(f"error: lm_eval wrote no results under {work / name}")
    return json.loads(files[-1].read_text())["results"][task]

got = {name: metrics(name) for name in names}
print()
print(f"task {task} (benchmarks/lm_eval_tasks)")
print(f"{'model':9} {'word_perplexity':>16} {'byte_perplexity':>16} {'bits_per_byte':>14}  path")
for name, m in got.items():
    print(f"{name:9} {m['word_perplexity,none']:16.6f} {m['byte_perplexity,none']:16.6f} "
          f"{m['bits_per_byte,none']:14.8f}  {names[name]}")
a, b = got["original"]["word_perplexity,none"], got["release"]["word_perplexity,none"]
rel = abs(b - a) / a
print(f"relative difference of word perplexity: {rel:.3e} ({100 * rel:.4f}%), bound {100 * bound:.2f}%: "
      f"{'PASS' if rel <= bound else 'FAIL'}")
sys.exit(0 if rel <= bound else 1)
PY
