"""Scale benchmark: protect random-weight models with a real model's layer shapes at a few depths, measure wall
time, peak RSS and release bytes per layer, and extrapolate to the full depth.

    .venv/bin/python benchmarks/scale.py --shape llama3-8b --layers 1 2 --json results/scale-llama3-8b.json
    .venv/bin/python benchmarks/scale.py --shape smol-wide --layers 4 8      # issue 9's memory check
    /usr/bin/time -f %M .venv/bin/python benchmarks/scale.py --shape llama3-70b --layers 80 --build-only --workdir W

The random models are written shard by shard (make_model): building one holds a single shard, whatever the depth.

Each protect runs in its own process under /usr/bin/time (peak RSS of that process alone).  Per-layer cost and
fixed cost come from a straight-line fit over the depths: time(L) = a + b·L, and the same for RSS and bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from taylormlp.common.paths import write_text_atomically

SHAPES = {
    # Llama-3-8B: hidden 4096, intermediate 14336, 32 query / 8 key-value heads, vocabulary 128256, 32 layers
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=128256, full_layers=32, tie_word_embeddings=False),
    # issue 9's memory check: hidden 1536, intermediate 6144, SmolLM2's vocabulary
    # Llama-3-70B: hidden 8192, intermediate 28672, 64 query / 8 key-value heads, 80 layers (its layer: 1.7 GB bf16)
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                       vocab_size=128256, full_layers=80, tie_word_embeddings=False),
    # SmolLM2-135M's own shape (hidden 576, intermediate 1536, 9 query / 3 key-value heads, 30 layers): the GPU check
    # measures the throughput curve on it (random weights: the real model does not travel to the GPU machine)
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                    vocab_size=49152, full_layers=30, tie_word_embeddings=True),
    "smol-wide": dict(hidden_size=1536, intermediate_size=6144, num_attention_heads=16, num_key_value_heads=4,
                      vocab_size=49152, full_layers=32, tie_word_embeddings=True),
}


def make_model(directory: Path, shape: dict, layers: int, seed: int = 0, tokenizer: Path | None = None,
               device: str = "cpu", gate_std: float = 0.02) -> int:
    """A random-weight Llama with `shape` and `layers` decoder layers, saved in bf16 with SmolLM2's tokenizer
    (chat template included).  Written tensor group by tensor group: the embedding, the head and the final norm each
    in their own shard, then one shard per decoder layer, each generated (normal, std 0.02; norms 1), written and
    freed before the next, so that making it holds one shard at a time (the largest: the embedding, 1 GB for the
    Llama-3 shapes' 128256 x 4096) whatever the depth.  `tokenizer`: a directory holding SmolLM2's tokenizer files
    (where the built-in model is not installed, e.g. the GPU machine).  `device`: where the random numbers are drawn
    (cuda: on the GPU, then copied back for writing; the 8B shape's 16 GB took over 240 s to draw on the GPU machine's
    CPU, 96 s on this 2-core one).  `gate_std`: the std of the MLP gate weights (the rest: 0.02).  At 0.02 a hidden size
    of 4096 gives gate pre-activations about 9 wide (std 0.02·√4096 ≈ 1.3, ±3.5σ over the calibration tokens), beyond
    the radius where SiLU's Taylor series converges (π around 0), so a paper-preset release is not token-exact;
    0.003 gives widths about 1.4, like the narrow channels of a real model.  Returns the bytes of its safetensors
    files."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from taylormlp.release.sources import resolve_source

    tok = AutoTokenizer.from_pretrained(tokenizer or resolve_source("smollm2-135m-instruct"))
    config = LlamaConfig(hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
                         num_attention_heads=shape["num_attention_heads"],
                         num_key_value_heads=shape["num_key_value_heads"], vocab_size=shape["vocab_size"],
                         num_hidden_layers=layers, tie_word_embeddings=shape["tie_word_embeddings"],
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, max_position_embeddings=4096)
    with torch.device("meta"):  # names and shapes only: no weight is allocated
        shapes = {name: tuple(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    groups: list[list[str]] = [[n] for n in shapes if not n.startswith("model.layers.")]
    groups += [[n for n in shapes if n.startswith(f"model.layers.{i}.")] for i in range(layers)]
    directory.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for k, names in enumerate(groups):
        gen = torch.Generator(device=device).manual_seed(seed * 100_003 + k)
        tensors = {}
        for name in names:
            t = torch.empty(shapes[name], dtype=torch.bfloat16, device=device)
            std = gate_std if name.endswith("mlp.gate_proj.weight") else 0.02
            tensors[name] = (t.fill_(1.0) if "norm" in name else t.normal_(0.0, std, generator=gen)).cpu()
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, directory / file, metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = file
            total += t.numel() * t.element_size()
        del tensors
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.dtype = torch.bfloat16
    config.save_pretrained(directory)
    GenerationConfig.from_model_config(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def run_protect(source: Path, out: Path, args) -> dict:
    cmd = ["/usr/bin/time", "-f", "MAXRSS_KB=%M", sys.executable, "-m", "taylormlp.cli", "protect", str(source),
           "--out", str(out), "--preset", args.preset, "--dtype", "bfloat16", "--device", args.device,
           "--calibration-samples", str(args.calibration_samples), "--force"]
    if args.coverage is not None:
        cmd += ["--coverage", str(args.coverage)]
    env = {**os.environ, "TAYLORMLP_QUIET": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"protect failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss = int(re.search(r"MAXRSS_KB=(\d+)", proc.stderr).group(1)) * 1024
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"wall_s": wall, "peak_rss_bytes": rss, "release_bytes": size}


def fit(xs, ys):
    """(fixed, per_layer) of the straight line through the points (exact for two depths)."""
    b, a = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(a), float(b)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="llama3-8b")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2], help="depths to run (at least two)")
    parser.add_argument("--preset", default="paper", choices=["paper", "default"])
    parser.add_argument("--coverage", type=float, default=0.5, help="fixed coverage (default 0.5; none: search)")
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--device", default="cpu",
                        help="where protect runs and where --build-only draws the random weights (default cpu)")
    parser.add_argument("--workdir", type=Path, default=None, help="where models and releases go (default: a temp dir)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--gate-std", type=float, default=0.02,
                        help="std of the random MLP gate weights (default 0.02, as every other weight: pre-activations "
                             "too wide for a token-exact paper release at hidden 4096; 0.003: narrow, exact)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="directory with SmolLM2's tokenizer files (default: the built-in model's)")
    parser.add_argument("--build-only", action="store_true",
                        help="only build the random model of each depth into --workdir/model-L and keep it (run under "
                             "/usr/bin/time -f %%M to see the building's peak RSS); no protect")
    args = parser.parse_args()
    if args.build_only:
        if args.workdir is None:
            parser.error("--build-only keeps the models: give --workdir DIR")
        for layers in args.layers:
            start = time.perf_counter()
            size = make_model(args.workdir / f"model-{layers}", SHAPES[args.shape], layers, tokenizer=args.tokenizer,
                              device=args.device, gate_std=args.gate_std)
            print(f"{args.shape}, {layers} layers: {size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s "
                  f"-> {args.workdir / f'model-{layers}'}", flush=True)
        return 0
    if len(set(args.layers)) < 2:
        parser.error("--layers needs at least two different depths to separate fixed and per-layer cost")
    shape = SHAPES[args.shape]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="taylormlp-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for layers in args.layers:
            src, out = work / f"model-{layers}", work / f"release-{layers}"
            shutil.rmtree(src, ignore_errors=True)
            model_bytes = make_model(src, shape, layers, tokenizer=args.tokenizer, gate_std=args.gate_std)
            row = {"layers": layers, "model_bytes": model_bytes, **run_protect(src, out, args)}
            rows.append(row)
            print(f"{layers} layers: model {model_bytes / 1e9:.2f} GB, protect {row['wall_s']:.0f} s, "
                  f"peak RSS {row['peak_rss_bytes'] / 1e9:.2f} GB, release {row['release_bytes'] / 1e9:.2f} GB",
                  flush=True)
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    L = [r["layers"] for r in rows]
    full = shape["full_layers"]
    extrapolation = {}
    for key in ("wall_s", "peak_rss_bytes", "release_bytes", "model_bytes"):
        a, b = fit(L, [r[key] for r in rows])
        extrapolation[key] = {"fixed": a, "per_layer": b, f"at_{full}_layers": a + b * full}
    report = {"shape": args.shape, **{k: v for k, v in shape.items()}, "preset": args.preset,
              "coverage": args.coverage, "calibration_samples": args.calibration_samples, "device": args.device,
              "machine": {"cpu": platform.processor() or platform.machine(), "threads": os.cpu_count()},
              "runs": rows, "extrapolation": extrapolation,
              "peak_rss_ratio_deepest_to_shallowest": rows[-1]["peak_rss_bytes"] / rows[0]["peak_rss_bytes"]}
    e = extrapolation
    print(f"per layer: {e['wall_s']['per_layer']:.1f} s, {e['peak_rss_bytes']['per_layer'] / 1e6:.0f} MB RSS, "
          f"{e['release_bytes']['per_layer'] / 1e9:.2f} GB release")
    print(f"extrapolated to {full} layers: {e['wall_s'][f'at_{full}_layers'] / 3600:.2f} h, peak RSS "
          f"{e['peak_rss_bytes'][f'at_{full}_layers'] / 1e9:.2f} GB, release {e['release_bytes'][f'at_{full}_layers'] / 1e9:.1f} GB")
    print(f"peak RSS ratio {rows[-1]['layers']} vs {rows[0]['layers']} layers: "
          f"{report['peak_rss_ratio_deepest_to_shallowest']:.3f}")
    if args.json:
        write_text_atomically(args.json, json.dumps(report, indent=1), "--json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
