"""Fidelity frontier: variant x order x coverage -> validation tokens matched and max logit error.

Variants: "paper" (Taylor, narrowest channels first), "chebyshev-1piece" (one Chebyshev series per channel
with tangent ends on the calibrated interval widened by 5%), "default" (the default preset: pieces, intervals
widened by half their width).

usage: .venv/bin/python benchmarks/frontier.py [--source smollm2-135m-instruct] [--out results/frontier.json]
                                               [--cache results/calibration-smollm2.pkl]

Calibrates once with the built-in corpus (the same data `taylormlp protect` uses), then evaluates every
combination on the validation split (teacher-forced on the original's greedy continuations).
"""

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch

from taylormlp.protection.calibration import calibrate
from taylormlp.measure.decode import validate
from taylormlp.protection.options import ProtectOptions
from taylormlp.protection.protector import Protector
from taylormlp.release.sources import is_chat_model, load_base


VARIANTS = {
    "paper": dict(preset="paper"),
    "chebyshev-1piece": dict(preset="default", max_pieces=1, margin=0.05),
    "default": dict(preset="default"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="smollm2-135m-instruct")
    ap.add_argument("--out", type=Path, default=Path("results/frontier.json"))
    ap.add_argument("--cache", type=Path, help="pickle of (calibration data, ranges) to reuse or create")
    ap.add_argument("--orders", default="4,8,16")
    ap.add_argument("--coverages", default="0.1,0.25,0.5,0.75,0.9,1.0")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    model, tok, _ = load_base(args.source)
    if args.cache and args.cache.exists():
        data, ranges = pickle.loads(args.cache.read_bytes())
    else:
        data, ranges = calibrate(model, tok, None, ProtectOptions().resolved(), is_chat_model(tok))
        if args.cache:
            args.cache.parent.mkdir(parents=True, exist_ok=True)
            args.cache.write_bytes(pickle.dumps((data, ranges)))
    rows = []
    for variant in args.variants.split(","):
        for order in [int(o) for o in args.orders.split(",")]:
            protector = Protector(model, ranges, ProtectOptions(order=order, **VARIANTS[variant]).resolved())
            for cov in [float(c) for c in args.coverages.split(",")]:
                start = time.perf_counter()
                masks = protector.masks(cov)
                with protector.installed(cov):
                    r = validate(model, data.validation)
                P = sum(int(m.sum()) for m in masks)
                Q = sum(int(np.isin(pc.owner, np.flatnonzero(m)).sum()) for pc, m in zip(protector.pieces, masks))
                row = {"variant": variant, "basis": protector.opts.basis, "order": order, "coverage": cov,
                       "pieces_per_channel": Q / P if P else None,
                       "tokens_matched": r["tokens_matched"], "tokens": r["tokens"],
                       "sequences_exact": r["sequences_exact"], "sequences": r["sequences"],
                       "max_logit_error": r["max_logit_error"]}
                rows.append(row)
                print(f"{variant:16} {row['basis']:9} N={order:<3} coverage={cov:<5} tokens {r['tokens_matched']}/"
                      f"{r['tokens']}  sequences {r['sequences_exact']}/{r['sequences']}  "
                      f"max logit error {r['max_logit_error']:.3g}  ({time.perf_counter() - start:.0f}s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"source": args.source, "rows": rows}, indent=1))
    print("| variant | basis | order | coverage | pieces/channel | tokens matched | sequences exact | max logit error |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        pieces = f"{r['pieces_per_channel']:.2f}" if r["pieces_per_channel"] else "-"
        print(f"| {r['variant']} | {r['basis']} | {r['order']} | {r['coverage']} | {pieces} | "
              f"{r['tokens_matched']}/{r['tokens']} | {r['sequences_exact']}/{r['sequences']} | "
              f"{r['max_logit_error']:.3g} |")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
