#!/usr/bin/env bash
# Issue 3 check: a fresh virtualenv with ONLY torch, transformers and safetensors loads a release with
# trust_remote_code=True and generates the same greedy tokens as taylormlp.load_release; and (format 2 releases) the
# stock loaders without the release's code (AutoModelForCausalLM without trust_remote_code, the base architecture's
# own class) refuse it with an error that says how to load it, instead of building random MLPs.
# usage: benchmarks/stock_loading_check.sh RELEASE_DIR
set -euo pipefail
release=$(cd "$1" && pwd)
here=$(cd "$(dirname "$0")/.." && pwd)
env=$(mktemp -d)/stock
python3 -m venv "$env"
"$env/bin/pip" install -q torch==2.13.0 "transformers>=5,<6" safetensors 2>&1 | grep -v "^WARNING: Location" || true
echo "stock environment packages:"; "$env/bin/pip" list 2>/dev/null | grep -iE "^(torch|transformers|safetensors|taylormlp|accelerate|gguf) " || true
cat > "$env/gen.py" <<'PY'
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d = sys.argv[1]
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
print("mlp class:", type(model.model.layers[0].mlp).__module__, type(model.model.layers[0].mlp).__name__, file=sys.stderr)
text = "The best way to learn programming is"
ids = tok(text, return_tensors="pt").input_ids
out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                     pad_token_id=tok.eos_token_id)
print(" ".join(map(str, out[0, ids.shape[1]:].tolist())))
PY
cat > "$env/refuse.py" <<'PY'
import sys, json, transformers
from transformers import AutoModelForCausalLM
d = sys.argv[1]
arch = json.load(open(d + "/config.json"))["architectures"][0]
for name, load in (("AutoModelForCausalLM.from_pretrained(DIR)", lambda: AutoModelForCausalLM.from_pretrained(d)),
                   (f"{arch}.from_pretrained(DIR)", lambda: getattr(transformers, arch).from_pretrained(d))):
    try:
        load()
    except Exception as exc:
        print(f"{name} refuses: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        continue
    print(f"{name} LOADED a model without the release's MLPs"); sys.exit(1)
PY
(cd /tmp && "$env/bin/python" "$env/refuse.py" "$release")
stock=$(cd /tmp && "$env/bin/python" "$env/gen.py" "$release")
ours=$("$here/.venv/bin/python" - "$release" <<'PY'
import sys, torch
from transformers import AutoTokenizer
import taylormlp
d = sys.argv[1]
tok = AutoTokenizer.from_pretrained(d)
model = taylormlp.load_release(d)
ids = tok("The best way to learn programming is", return_tensors="pt").input_ids
out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                     pad_token_id=tok.eos_token_id)
print(" ".join(map(str, out[0, ids.shape[1]:].tolist())))
PY
)
echo "stock transformers : $stock"
echo "taylormlp          : $ours"
if [ "$stock" = "$ours" ]; then echo "IDENTICAL"; else echo "DIFFERENT"; exit 1; fi
