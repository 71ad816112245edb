"""Issue 17, item 5: the slowdown curve on GPUs, PREDICTED from machine-independent work (taylormlp.measure.predict), for
the original and each release; runs on any machine (the CPU here), measures no time.

    .venv/bin/python benchmarks/gpu_prediction.py smollm2-135m-instruct releases/smollm2-default \
        releases/smollm2-slow4 --out results/gpu-prediction.md

Counts one cached decode step at each batch size (bench's prompt as the context; its KV cache repeated B times)
for the original and each release (loaded one at a time), and writes the markdown tables to --out (it must not
exist unless --force) and to stdout.  benchmarks/gpu_check.sh measures the same curve where a GPU is lent.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

from taylormlp.measure import predict
from taylormlp.measure.bench import prompt_ids
from taylormlp.common.paths import check_output_file, write_text_atomically
from taylormlp.release.directory import load_release, release_dtype
from taylormlp.release.sources import load_base


def work(model, ids, batches) -> dict:
    with torch.no_grad():
        return {b: predict.step_work(model, ids, b) for b in batches}


def summary(name: str, counted: dict) -> str:
    return "; ".join(f"batch {b}: {w['bytes'] / 1e6:.0f} MB, {w['flops'] / 1e9:.2f} GFLOP, {w['kernels']} kernels, "
                     f"{w['syncs']} host syncs" for b, w in sorted(counted.items())) + f" ({name})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="the original model SOURCE")
    ap.add_argument("releases", nargs="+", type=Path, help="release directories made from it")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="default 1 8 32")
    ap.add_argument("--out", type=Path, required=True, help="markdown file to write (new unless --force)")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = ap.parse_args(argv)
    check_output_file(args.out, "--out", args.force)
    batches = sorted(set(args.batch_sizes))
    base, tokenizer, _ = load_base(args.source, dtype=release_dtype(args.releases[0]))  # in the releases' dtype
    ids, _ = prompt_ids(tokenizer)
    original = work(base, ids, batches)
    del base
    gc.collect()
    lines = ["# The slowdown curve on GPUs: a PREDICTION", "",
             f"Not measured. Predicted by `benchmarks/gpu_prediction.py` (taylormlp.measure.predict) from the work of one "
             f"cached decode step of `{args.source}` and each release, counted operator by operator (bytes moved, "
             f"FLOPs, kernels) with a {ids.shape[1]}-token context, and a roofline per operator with the datasheet "
             f"figures below. engine = kernels back to back (launches hidden: CUDA graphs, a serving engine); "
             f"eager = every operator costs at least one launch ({predict.LAUNCH_S * 1e6:.0f} us assumed, eager "
             f"PyTorch). Measure it with `benchmarks/gpu_check.sh` where a GPU is lent.", "",
             "| GPU (assumed) | bandwidth | FP32 | BF16 tensor (dense) |", "| --- | --- | --- | --- |"]
    lines += [f"| {g.name} | {g.bandwidth / 1e12:.2f} TB/s | {g.fp32 / 1e12:.1f} TFLOP/s | {g.tensor / 1e12:.0f} TFLOP/s |"
              for g in predict.GPUS]
    lines += ["", f"Work counted: {summary('original', original)}.", ""]
    for path in args.releases:
        model = load_release(path)
        counted = work(model, ids, batches)
        del model
        gc.collect()
        lines += predict.format_prediction(path.name, predict.predict_curve(original, counted))
        lines += ["", f"Work counted: {summary(path.name, counted)}.", ""]
    text = "\n".join(lines)
    print(text)
    write_text_atomically(args.out, text + "\n", "--out")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
