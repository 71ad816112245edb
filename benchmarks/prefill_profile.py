"""Where a release's prompt time goes on our runtime: each stage of every TaylorMLP, timed on the inputs it gets
during a real prefill, summed over the layers, beside the original's MLPs and the whole prefill of both.

    .venv/bin/python benchmarks/prefill_profile.py smollm2-135m-instruct releases/smollm2-default \
        --prompt-tokens 512 --dtype bfloat16 --json results/prefill-profile-smollm2-default.json

One prompt of P tokens of real text (measure/workload.py's), one prefill of each model to capture every MLP's input
(forward pre-hooks), then per layer the stages the runtime runs, each timed alone (median of 5 after a warm-up):

    gate+up      the two matmuls that give z and u of the protected channels
    select       z and u per series piece in float32 (runtime.select_pieces)
    coordinates  t_c and the excess (runtime.piece_coordinates)
    basis        the stacked features in Θ's dtype (runtime.stacked_features: series_basis)
    Θ matmul     the one stacked matmul: the series' own work, 2·d·(N+1)·Q FLOPs per token
    rest         the unprotected channels' ordinary MLP

"slack" is every stage but the matmuls: work that a fused kernel could remove, so an owner's dial promises what the
matmuls cost.  The achieved GFLOP/s of the Θ matmul and of the original MLPs' matmuls tell whether the series runs at
the original's speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from taylormlp import load_release, runtime
from taylormlp.measure.workload import workload_prompts
from taylormlp.release.sources import load_base

STAGES = ("gate+up", "select", "coordinates", "basis", "Θ matmul", "rest")


def seconds(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def mlp_inputs(model, ids) -> list[torch.Tensor]:
    """Every decoder layer's MLP input during one prefill of `ids`."""
    seen, hooks = [], []
    for layer in runtime.decoder_layers(model):
        hooks.append(layer.mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach())))
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return seen


def stage_times(mlp, x) -> dict[str, float]:
    """Each stage of one TaylorMLP on its input `x`, alone."""
    out = {stage: 0.0 for stage in STAGES}
    if mlp.rest is not None:
        out["rest"] = seconds(lambda: mlp.rest(x))
    if not mlp.protected:
        return out
    index = (mlp.owner, mlp.edge_lo, mlp.edge_hi) if mlp.pieces > mlp.protected else None
    out["gate+up"] = seconds(lambda: (mlp.gate(x), mlp.up(x) if mlp.up is not None else None))
    z, u = mlp.gate(x), mlp.up(x) if mlp.up is not None else None
    out["select"] = seconds(lambda: runtime.select_pieces(z, u, index))
    zp, up, active = runtime.select_pieces(z, u, index)
    out["coordinates"] = seconds(lambda: runtime.piece_coordinates(zp, mlp.z0, mlp.h))
    tc, excess = runtime.piece_coordinates(zp, mlp.z0, mlp.h)
    dtype = mlp.theta.dtype
    out["basis"] = seconds(lambda: runtime.stacked_features(tc, excess, up, active, mlp.order, mlp.basis, dtype))
    features = runtime.stacked_features(tc, excess, up, active, mlp.order, mlp.basis, dtype)
    out["Θ matmul"] = seconds(lambda: torch.nn.functional.linear(features, mlp.theta))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source")
    p.add_argument("release", type=Path)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    release = load_release(args.release, dtype=dtype)
    base, tokenizer, _ = load_base(args.source, dtype=dtype)
    ids = torch.tensor([workload_prompts(tokenizer, args.prompt_tokens, 1)[0]])
    T, d = ids.shape[1], base.config.hidden_size
    with torch.no_grad():
        prefill = {"original": seconds(lambda: base(input_ids=ids, use_cache=False), 3),
                   "release": seconds(lambda: release(input_ids=ids, use_cache=False), 3)}
        totals = {stage: 0.0 for stage in STAGES}
        original_mlps = theta_flops = original_flops = 0.0
        for mlp, x, orig, ox in zip((l.mlp for l in runtime.decoder_layers(release)), mlp_inputs(release, ids),
                                    (l.mlp for l in runtime.decoder_layers(base)), mlp_inputs(base, ids)):
            for stage, value in stage_times(mlp, x).items():
                totals[stage] += value
            original_mlps += seconds(lambda: orig(ox))
            theta_flops += 2.0 * T * mlp.theta.numel()
            original_flops += 2.0 * T * sum(m.weight.numel() for m in orig.modules() if isinstance(m, torch.nn.Linear))
    release_mlps = sum(totals.values())
    slack = release_mlps - totals["Θ matmul"] - totals["gate+up"] - totals["rest"]
    result = {"source": args.source, "release": str(args.release), "dtype": args.dtype, "prompt_tokens": T,
              "hidden": d, "threads": torch.get_num_threads(), "prefill_s": prefill,
              "prefill_ratio": prefill["release"] / prefill["original"],
              "original_mlps_s": original_mlps, "release_mlps_s": release_mlps, "stages_s": totals,
              "slack_s": slack, "theta_gflops_per_s": theta_flops / totals["Θ matmul"] / 1e9,
              "original_mlp_gflops_per_s": original_flops / original_mlps / 1e9}
    args.json.write_text(json.dumps(result, indent=1))
    print(f"{args.release} against {args.source}, one prefill of {T} tokens, {args.dtype}, "
          f"{torch.get_num_threads()} threads")
    print(f"whole prefill: original {prefill['original'] * 1e3:.0f} ms, release {prefill['release'] * 1e3:.0f} ms "
          f"({result['prefill_ratio']:.2f}x)")
    print(f"MLPs: original {original_mlps * 1e3:.0f} ms ({result['original_mlp_gflops_per_s']:.0f} GFLOP/s), "
          f"release {release_mlps * 1e3:.0f} ms")
    for stage in STAGES:
        print(f"  {stage:12s} {totals[stage] * 1e3:8.0f} ms  {totals[stage] / release_mlps:6.1%}")
    print(f"Θ matmul at {result['theta_gflops_per_s']:.0f} GFLOP/s; slack (select + coordinates + basis) "
          f"{slack * 1e3:.0f} ms = {slack / release_mlps:.1%} of the release's MLP time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
