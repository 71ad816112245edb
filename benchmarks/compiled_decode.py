"""The throttle on a compiled graph, the way engines decode (issue 30): eager against torch.compile with a static KV
cache and, on a GPU, CUDA graphs (mode "reduce-overhead", as gpt-fast reaches ~4x over eager at batch 1).

For the original and each release: greedy decoding of `--tokens` tokens from B copies of bench's prompt, through
transformers' own compiled decoding (`generate` with `cache_implementation="static"` and a CompileConfig: the
one-token decode step compiled, fullgraph, in MODE), every model, mode and batch size timed in interleaved rounds
after a warm-up run that pays the compilation; beside it the same models eager (dynamic cache).  The slowdown is the release's decode
time over the original's in the same round and mode (median and range of the paired ratios).

    python benchmarks/compiled_decode.py MODEL RELEASE... --device cuda --batch-sizes 1 8 32 --json OUT.json --md OUT.md
    (CPU rehearsal: --device cpu --mode default, on a tiny model; CUDA graphs exist only on a GPU)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from taylormlp.measure.bench import prompt_ids
from taylormlp.measure.decode import batch_ids, interleaved, paired_ratios
from taylormlp.common.paths import write_text_atomically
from taylormlp.release.directory import load_release, release_dtype
from taylormlp.release.sources import load_base, load_tokenizer, resolve_source


def timed_generate(model, ids: torch.Tensor, tokens: int, device: str, compile_mode: str | None) -> dict:
    """Wall time of a greedy generate of exactly `tokens` new tokens (EOS suppressed until then), synchronized.
    `compile_mode`: transformers' own compiled decoding (a static KV cache, the one-token decode step compiled with
    torch.compile in that mode, fullgraph); None: eager with the dynamic cache."""
    from transformers import CompileConfig

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    config = CompileConfig(mode=compile_mode, fullgraph=True) if compile_mode else None
    if config is not None:
        config._compile_all_devices = device == "cpu"  # transformers compiles on accelerators only unless told
    how = dict(cache_implementation="static", compile_config=config) if config else dict(disable_compile=True)
    sync()
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                   do_sample=False, pad_token_id=0, **how)
    sync()
    return {"s": time.perf_counter() - start}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source")
    ap.add_argument("releases", nargs="+", type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--mode", default="reduce-overhead", help="torch.compile mode (default reduce-overhead: CUDA graphs)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args()

    source = resolve_source(args.source)
    dtype = release_dtype(args.releases[0])
    prompt = prompt_ids(load_tokenizer(source))[0].to(args.device)
    models = {"original": load_base(source, dtype=dtype)[0]}
    models.update({r.name: load_release(r, dtype=dtype) for r in args.releases})
    runs = {}
    for name, model in models.items():
        model.to(args.device)
        for b in args.batch_sizes:
            ids = batch_ids(prompt, b).to(args.device)
            for mode, compile_mode in (("eager", None), ("compiled", args.mode)):
                runs[(mode, b, name)] = (lambda m=model, x=ids, c=compile_mode:
                                         timed_generate(m, x, args.tokens, args.device, c))
    timings = interleaved(runs, args.repeats, "timing eager and compiled (interleaved)")
    rows = []
    for mode in ("eager", "compiled"):
        for b in args.batch_sizes:
            base = timings[(mode, b, "original")]
            for name in models:
                ratios = paired_ratios(timings[(mode, b, name)], base, "s")
                s = statistics.median(t["s"] for t in timings[(mode, b, name)])
                rows.append({"mode": mode, "batch": b, "model": name, "seconds": s,
                             "tokens_per_s": b * args.tokens / s, "slowdown": statistics.median(ratios),
                             "slowdown_min": min(ratios), "slowdown_max": max(ratios)})
    report = {"command": " ".join(["benchmarks/compiled_decode.py", *sys.argv[1:]]), "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "dtype": str(dtype),
              "compile_mode": args.mode, "tokens": args.tokens, "repeats": args.repeats, "rows": rows}
    write_text_atomically(args.json, json.dumps(report, indent=1))
    if args.md:
        lines = [f"{report['device']}, {report['dtype']}, {args.tokens} tokens, torch.compile mode {args.mode!r} with a "
                 f"static cache against eager; slowdown = decode time over the original's, same mode and round", "",
                 "| mode | batch | model | tok/s | slowdown (range) |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['mode']} | {r['batch']} | {r['model']} | {r['tokens_per_s']:.1f} | {r['slowdown']:.2f}x "
                  f"({r['slowdown_min']:.2f}-{r['slowdown_max']:.2f}) |" for r in rows]
        write_text_atomically(args.md, "\n".join(lines) + "\n")
    for r in rows:
        print(f"{r['mode']:8} batch {r['batch']:3} {r['model']:24} {r['tokens_per_s']:9.1f} tok/s  "
              f"{r['slowdown']:.2f}x ({r['slowdown_min']:.2f}-{r['slowdown_max']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
