"""Issue 19: generate with a release larger than the memory it is given, through accelerate's offload, and the
original loaded the same way; report peak RSS, seconds per token and agreement with the original.

    .venv/bin/python benchmarks/offload_generate.py W/model-32 W/rel-32 --max-memory cpu=4GiB \
        --offload-folder W/offload --tokens 16 --json results/offload-llama3-8b.json
    python3 benchmarks/offload_generate.py W/model-32 W/rel-32 --max-memory 0=8GiB cpu=64GiB ...   # a GPU

Each model runs in a process of its own (its peak RSS is that process's own, resource.getrusage): the original
first, greedy for --tokens tokens from bench's prompt; then the release, which decodes the same way and is also
teacher-forced on the original's continuation (decode.tokens_matched: do its argmaxes pick the original's tokens at
every position?).  Both load with device_map="auto" and --max-memory (module placement by accelerate; what does not
fit goes to disk and is read back from the safetensors files at every forward).  Seconds per token are the decode
steps after the first token (decode.greedy, timed), the prefill apart.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


def parse_memory(items: list[str]) -> dict:
    """["cpu=4GiB", "0=8GiB"] -> {"cpu": "4GiB", 0: "8GiB"} (accelerate's max_memory)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise SystemExit(f"--max-memory takes DEVICE=SIZE (e.g. cpu=4GiB, 0=8GiB), got {item!r}")
        out[int(key) if key.isdigit() else key] = value
    return out


def run_one(args) -> dict:
    """In the child: load one model with the placement, decode greedily, (release) teacher-force on the original."""
    import torch
    from transformers import AutoModelForCausalLM

    from taylormlp.measure.bench import prompt_ids
    from taylormlp.measure.decode import greedy, tokens_matched
    from taylormlp.release.directory import load_release
    from taylormlp.release.sources import load_tokenizer

    torch.manual_seed(0)
    placement = {"device_map": "auto", "max_memory": parse_memory(args.max_memory),
                 "offload_folder": str(args.offload_folder)}
    start = time.perf_counter()
    if args.one == "original":
        model = AutoModelForCausalLM.from_pretrained(args.source, dtype=getattr(torch, args.dtype),
                                                     use_safetensors=True, **placement)
    else:
        model = load_release(args.release, dtype=getattr(torch, args.dtype), **placement)
    model.eval()
    load_s = time.perf_counter() - start
    tokenizer = load_tokenizer(Path(args.source))
    ids, _ = prompt_ids(tokenizer)
    run = greedy(model, ids, args.tokens, timed=True)
    row = {"model": args.one, "load_s": load_s, "prefill_s": run.prefill_s,
           "s_per_token": run.decode_s / max(args.tokens - 1, 1), "prompt_tokens": run.prompt_tokens,
           "tokens": run.new[0].tolist(),
           "placement": dict(Counter(str(d) for d in getattr(model, "hf_device_map", {"": "cpu"}).values()))}
    if args.reference:
        reference = json.loads(Path(args.reference).read_text())
        seq = {"ids": torch.tensor(reference["ids"]), "prompt_len": reference["prompt_len"]}
        with torch.no_grad():
            row["teacher_forced"] = tokens_matched(model, [seq])
    else:
        row["ids"] = run.ids[0].tolist()
    if torch.cuda.is_available():
        row["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return row


def child(args, which: str, reference: Path | None) -> dict:
    cmd = [sys.executable, __file__, str(args.source), str(args.release), "--one", which, "--tokens", str(args.tokens),
           "--dtype", args.dtype,
           "--offload-folder", str(args.offload_folder / which), "--max-memory", *args.max_memory]
    if reference is not None:
        cmd += ["--reference", str(reference)]
    env = {**os.environ, "TAYLORMLP_QUIET": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{which} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["process_wall_s"] = time.perf_counter() - start
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="the original model directory (safetensors)")
    ap.add_argument("release", type=Path, help="a release made from it")
    ap.add_argument("--max-memory", nargs="+", default=["cpu=4GiB"],
                    help="accelerate's max_memory as DEVICE=SIZE pairs (default cpu=4GiB; on a GPU e.g. 0=8GiB "
                         "cpu=64GiB)")
    ap.add_argument("--offload-folder", type=Path, default=None,
                    help="where accelerate may write offloaded weights (default: a temporary directory)")
    ap.add_argument("--tokens", type=int, default=16, help="greedy tokens to generate (default 16)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="dtype both models are loaded in (default bfloat16)")
    ap.add_argument("--json", type=Path, help="write the report to this file")
    ap.add_argument("--one", choices=["original", "release"], help=argparse.SUPPRESS)
    ap.add_argument("--reference", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tokens < 2:
        ap.error("--tokens must be at least 2")
    if args.one:
        print(json.dumps(run_one(args)))
        return 0
    from taylormlp.measure.decode import first_divergence
    from taylormlp.common.paths import write_text_atomically

    with tempfile.TemporaryDirectory(prefix="taylormlp-offload-") as tmp:
        if args.offload_folder is None:
            args.offload_folder = Path(tmp) / "offload"
        original = child(args, "original", None)
        reference = Path(tmp) / "reference.json"
        reference.write_text(json.dumps({"ids": original.pop("ids"), "prompt_len": original["prompt_tokens"]}))
        release = child(args, "release", reference)
    size = {name: sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))
            for name, d in (("original", args.source), ("release", args.release))}
    report = {"source": str(args.source), "release": str(args.release), "max_memory": args.max_memory, "dtype": args.dtype,
              "tokens": args.tokens, "weights_bytes": size, "original": original, "release_run": release,
              "identical_tokens": first_divergence(original["tokens"], release["tokens"]),
              "threads": os.cpu_count()}
    tf = release["teacher_forced"]
    for name, row in (("original", original), ("release", release)):
        print(f"{name}: {size[name] / 1e9:.1f} GB of weights, placement {row['placement']}, load {row['load_s']:.0f} s, "
              f"prefill {row['prefill_s']:.1f} s, {row['s_per_token']:.2f} s/token, "
              f"peak RSS {row['peak_rss_bytes'] / 1e9:.2f} GB")
    print(f"greedy: {report['identical_tokens']}/{args.tokens} tokens identical before the first difference; "
          f"teacher-forced {tf['tokens_matched']}/{tf['tokens']} of the original's tokens picked by the release")
    if args.json:
        write_text_atomically(args.json, json.dumps(report, indent=1), "--json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
