"""Where a release's prompt time goes on vLLM's native path: every VllmTaylorMLP's stages, called one by one in the
engine's own process on a prompt-sized input, summed over the layers.

    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python benchmarks/vllm_prefill_profile.py releases/smollm2-default \
        --tokens 4096 --json results/vllm-prefill-profile-smollm2-default.json

The engine is built as `LLM(model=RELEASE)` builds it (taylormlp's plugin, the engine's dtype, bfloat16 on a CPU; eager,
since the layers are called directly), then per layer on x = [T, d] (a fixed random input scaled like the hidden
states; T = the prefill's tokens, e.g. 8 prompts of 512):

    gate+up        vLLM's MergedColumnParallelLinear
    select+coords  runtime.select_pieces and piece_coordinates (eager here; fused by torch.compile in the engine)
    basis          runtime.stacked_features (the custom op's body: the same code compiled mode calls)
    Θ (vLLM)       the layer's RowParallelLinear, vLLM's CPU GEMM
    Θ (torch)      torch.nn.functional.linear on the same features and a weight of Θ's shape: torch's GEMM
    whole MLP      the layer's forward

Each is the median of 3 calls after a warm-up.  The Θ GEMMs' GFLOP/s say whether the series' matmul runs at the
machine's speed and which GEMM is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from prefill_profile import seconds  # benchmarks/: the same timer as our runtime's stage profile


def seconds3(fn) -> float:
    """prefill_profile.seconds with 3 timed calls (a prompt of thousands of tokens per call)."""
    return seconds(fn, 3)

STAGES = ("gate+up", "select+coords", "basis", "Θ (vLLM)", "Θ (torch)", "whole MLP")


def profile(model, tokens: int) -> dict:
    """The stages of every VllmTaylorMLP of `model` (in the engine's process) on a [tokens, d] input."""
    import torch

    from taylormlp import runtime
    from taylormlp.serve.vllm_native import VllmTaylorMLP

    totals = {stage: 0.0 for stage in STAGES}
    flops = 0.0
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, VllmTaylorMLP) or not (m.protected and m.local):
                continue
            dtype = m.gate_up.weight.dtype
            x = (torch.randn(tokens, m.hidden, generator=gen) * 0.5).to(dtype)
            index = (m.owner, m.edge_lo, m.edge_hi) if m.piecewise else None

            def coords():
                z, u = m.gate_up(x)[0].split(m.per, dim=-1)
                z, u = (z[..., :m.local], u[..., :m.local]) if index is None else (z, u)
                z, u, active = runtime.select_pieces(z, u, index)
                return (*runtime.piece_coordinates(z, m.z0, m.h), u, active)

            totals["gate+up"] += seconds3(lambda: m.gate_up(x))
            totals["select+coords"] += seconds3(coords) - seconds3(lambda: m.gate_up(x))
            tc, excess, u, active = coords()
            totals["basis"] += seconds3(lambda: runtime.stacked_features(tc, excess, u, active, m.order, m.basis,
                                                                         m.dtype))
            feats = runtime.stacked_features(tc, excess, u, active, m.order, m.basis, m.dtype)
            totals["Θ (vLLM)"] += seconds3(lambda: m.theta(feats))
            # vLLM's CPU linear may keep its weight packed for its own GEMM (the parameter then holds no values):
            # torch's GEMM gets a weight of the same shape and dtype (its time does not depend on the values)
            weight = torch.randn(m.hidden, feats.shape[-1], generator=gen).to(feats.dtype)
            totals["Θ (torch)"] += seconds3(lambda: torch.nn.functional.linear(feats, weight))
            totals["whole MLP"] += seconds3(lambda: m(x))
            flops += 2.0 * tokens * weight.numel()
    return {"stages_s": totals, "theta_gflop": flops / 1e9,
            "theta_vllm_gflops_per_s": flops / totals["Θ (vLLM)"] / 1e9,
            "theta_torch_gflops_per_s": flops / totals["Θ (torch)"] / 1e9}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("release", type=Path)
    p.add_argument("--tokens", type=int, default=4096, help="T, the prefill's tokens (default 4096: 8 prompts of 512)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model in this process: apply_model runs here
    from taylormlp.serve.vllm_engine import engine_environment

    os.environ.update(engine_environment())
    import torch
    from vllm import LLM

    llm = LLM(model=str(args.release), dtype=args.dtype, enforce_eager=True, max_model_len=512, seed=0)
    result = {"release": str(args.release), "tokens": args.tokens, "torch_threads": torch.get_num_threads(),
              "series_dtype": os.environ.get("TAYLORMLP_VLLM_SERIES_DTYPE", "mixed"),
              **llm.apply_model(lambda model: profile(model, args.tokens))[0]}
    args.json.write_text(json.dumps(result, indent=1))
    whole = result["stages_s"]["whole MLP"]
    print(f"{args.release} on vLLM, natively, T = {args.tokens} tokens, series {result['series_dtype']}")
    for stage, value in result["stages_s"].items():
        print(f"  {stage:14s} {value * 1e3:9.0f} ms  {value / whole:6.1%} of the whole MLP")
    print(f"Θ GEMM: vLLM {result['theta_vllm_gflops_per_s']:.0f} GFLOP/s, torch "
          f"{result['theta_torch_gflops_per_s']:.0f} GFLOP/s ({result['theta_gflop']:.0f} GFLOP)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
