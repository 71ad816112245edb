"""`taylormlp bench`: what a release costs next to the original — latency, work, memory and size.

What is measured, and how:

* **Latency** (``decode.measure_decode``): one greedy run = a prefill forward on the prompt (``use_cache=True``)
  followed by exactly ``new_tokens`` single-token decode steps that reuse the KV cache and take the
  argmax.  It never stops early at EOS, so every model does the same amount of work.  Models are timed
  interleaved (``interleaved_latency``, over ``decode.interleaved``: one warm-up run each, then round robin per
  repeat, the starting model rotated each repeat) so that noise from other work on the machine hits all of them
  alike; the slowdown is the median of the per-repeat (paired) ratios of decode times, with their range.
* **Work** (``flops_per_token``): matmul FLOPs of one single-token forward counted by
  ``torch.utils.flop_counter.FlopCounterMode`` — deterministic, independent of machine noise.
* **Time per series term** (``term_benchmark``): for the layer with the most protected channels, the
  TaylorMLP on one token against a plain ``F.linear`` with a [d × P] weight (what one term's matmul
  would cost alone).  per term = (TaylorMLP time − time of its non-series parts: gate, up and the
  unprotected ``rest`` MLP) / (N + 1).  The basis recurrence is counted as series work.  The plain
  matmul's small weight stays in CPU cache when called in a loop, while the stacked Θ of a real layer
  ((N+1)·P·d values) streams from memory, so a term usually costs a few plain matmuls.
* **Memory**: ``weights_bytes`` (parameters + buffers, exact) and, measured in a fresh subprocess per
  model, the peak resident set size (``VmHWM`` on Linux, else ``getrusage().ru_maxrss``) above the
  process's size after importing torch/transformers, once after loading and once after one decode run
  of the same prompt.  RSS includes memory-mapped weight pages and allocator slack; it is what the OS charges.
  ``series_feature_bytes_per_token`` is the analytic size of the largest layer's stacked basis features
  ((N+1)·P values per token), the activation that grows with the order.
* **Size**: every file in the release directory (``release_size``); for the original, its model directory.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..common import machine
from ..common.errors import TaylorMLPError
from ..common.paths import write_text_atomically
from ..common.progress import bar, log, status
from ..release.directory import load_release, release_dtype, release_size
from ..release.sources import is_chat_model, load_base
from ..runtime import decoder_layers
from .cost import flops_per_token, parameter_bytes_read, series_feature_bytes_per_token, taylor_mlps, weights_bytes
from .decode import decode_timings, interleaved, measure_decode, phase_ratios, timing_summary
from .generate import encode_prompt
from .report import format_serve, format_table, format_throughput, plot_results, plot_throughput
from .throughput import bench_timings, throughput_rows

PROMPT = "Explain in three sentences why the sky is blue during the day and red at sunset."
ORIGINAL = "original"


# ---------------------------------------------------------------- one run, many runs


def interleaved_latency(models: dict, input_ids, new_tokens: int, repeats: int, runs: dict | None = None) -> dict:
    """Time every model `repeats` times, interleaved, after one warm-up run each (or take such `runs`, per name,
    from a run that timed more: throughput.bench_timings' batch 1).

    Each repeat runs every model once (round robin; the first model rotates from repeat to repeat), so
    slow phases of a shared machine fall on all models alike.  Returns per name: "decode_s_median",
    "decode_s_spread" (max − min), "decode_tokens_per_s_median", "prefill_s_median", "prefill_s_spread",
    "runs" (the measure_decode results without token lists)."""
    runs = decode_timings(models, input_ids, new_tokens, repeats) if runs is None else runs
    return {name: {**timing_summary(runs[name]), "runs": runs[name]} for name in runs}


# ---------------------------------------------------------------- deterministic work, memory estimates


# ---------------------------------------------------------------- time per series term


def _timer(fn, target_s: float = 0.02) -> tuple[callable, int]:
    fn()  # warm-up
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    iters = max(3, min(5000, int(target_s / once)))

    def block() -> float:
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) / iters

    return block, iters


@torch.no_grad()
def term_benchmark(mlp, blocks: int = 7) -> dict | None:
    """Time one TaylorMLP on a single token against one plain [d × Q] matmul, Q = series pieces (= protected
    channels unless the release is piecewise; see module docstring)."""
    P, N, d = int(mlp.protected), int(mlp.order), int(mlp.hidden)
    Q = int(getattr(mlp, "pieces", P))
    if P == 0:
        return None
    dtype = mlp.theta.dtype
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, d, generator=gen).to(dtype)
    feat = torch.randn(1, 1, Q, generator=gen).to(dtype)
    weight = torch.randn(d, Q, generator=gen).to(dtype)

    def overhead():
        mlp.gate(x)
        if mlp.up is not None:
            mlp.up(x)
        if mlp.rest is not None:
            mlp.rest(x)

    fns = {"mlp": lambda: mlp(x), "overhead": overhead,
           "term": lambda: torch.nn.functional.linear(feat, weight)}
    samples = interleaved({name: _timer(fn)[0] for name, fn in fns.items()}, blocks)  # blocks of the three
    med = {name: statistics.median(v) for name, v in samples.items()}
    per_term = max(med["mlp"] - med["overhead"], 0.0) / (N + 1)
    return {
        "protected": P, "pieces": Q, "order": N, "hidden": d, "terms": N + 1,
        "mlp_ms": med["mlp"] * 1e3,
        "overhead_ms": med["overhead"] * 1e3,
        "per_term_ms": per_term * 1e3,
        "plain_matmul_ms": med["term"] * 1e3,
        "per_term_vs_matmul": per_term / med["term"] if med["term"] > 0 else math.nan,
    }


def layer_term_benchmark(model) -> dict | None:
    """term_benchmark on the layer with the most protected channels (the first such layer)."""
    mlps = taylor_mlps(model)
    if not mlps:
        return None
    index = max(range(len(mlps)), key=lambda i: (mlps[i].protected, -i))
    res = term_benchmark(mlps[index])
    if res is not None:
        res["layer"] = index
    return res


# ---------------------------------------------------------------- peak memory in a fresh process


def _maxrss_bytes() -> int:
    """Peak resident set size of this process so far.

    Linux: ``VmHWM`` from /proc/self/status (the high-water mark of this process image).  Not
    ``getrusage().ru_maxrss``: Linux carries that over from the parent across fork+exec, so a child of a
    big parent would report the parent's peak.  Elsewhere ``ru_maxrss`` (bytes on macOS, KiB otherwise)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _memory_probe_main(argv: list[str]) -> None:
    """Child process: baseline RSS after imports, after loading, after one decode run; prints JSON."""
    kind, path, ids_json, tokens, threads, dtype = argv
    import transformers  # noqa: F401  (part of the baseline, as in any user's process)

    torch.set_num_threads(int(threads))
    base = _maxrss_bytes()
    if kind == "original":
        model = load_base(path, dtype=getattr(torch, dtype))[0]  # in the releases' dtype, as it was timed
    else:
        model = load_release(path, verify=False)
    loaded = _maxrss_bytes()
    measure_decode(model, torch.tensor([json.loads(ids_json)]), int(tokens))
    peak = _maxrss_bytes()
    print(json.dumps({"baseline_rss_bytes": base, "rss_after_load_bytes": loaded - base,
                      "rss_peak_bytes": peak - base}))


def memory_probe(kind: str, path, input_ids, tokens: int, timeout: float = 900.0,
                 dtype: torch.dtype = torch.float32) -> dict:
    ids = torch.as_tensor(input_ids).reshape(-1).tolist()
    code = "import sys; from taylormlp.measure.bench import _memory_probe_main; _memory_probe_main(sys.argv[1:])"
    env = {**os.environ, "TAYLORMLP_QUIET": "1"}
    try:
        proc = subprocess.run([sys.executable, "-c", code, kind, str(path), json.dumps(ids), str(tokens),
                               str(torch.get_num_threads()), str(dtype).removeprefix("torch.")],
                              capture_output=True, text=True, timeout=timeout,
                              env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"memory probe timed out after {timeout:.0f}s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"memory probe failed (exit {proc.returncode}): {tail[0]}"}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"error": "memory probe printed no result"}


# ---------------------------------------------------------------- the whole benchmark


def prompt_ids(tokenizer, prompt: str = PROMPT) -> tuple[torch.Tensor, bool]:
    """Token ids of the fixed prompt, chat-templated when the tokenizer has a template."""
    chat = is_chat_model(tokenizer)
    return encode_prompt(tokenizer, prompt, chat), chat


def describe(model) -> dict:
    spec = getattr(model.config, "taylormlp", None) or {}
    val = spec.get("validation") or {}
    return {
        "order": spec.get("order"),
        "basis": spec.get("basis"),
        "coverage": spec.get("coverage"),
        "preset": spec.get("preset"),
        "validation_max_logit_error": val.get("max_logit_error"),
        "validation_tokens_matched": val.get("tokens_matched"),
        "validation_tokens": val.get("tokens"),
    }


def bench_models(models: dict, input_ids, tokens: int, repeats: int, original: str = ORIGINAL,
                 term_bench: bool = True, runs: dict | None = None) -> list[dict]:
    """Latency (interleaved), FLOPs, weight bytes and the term microbenchmark for in-memory models.

    `models` maps names to models; `original` names the reference for the ratios; `runs`: the batch-1 timings
    when they were taken already (see interleaved_latency)."""
    if original not in models:
        raise ValueError(f"the reference model {original!r} is not among {list(models)}")
    latency = interleaved_latency(models, input_ids, tokens, repeats, runs)
    first_token = int(torch.as_tensor(input_ids).reshape(-1)[0])
    ref = latency[original]
    ref_flops = None
    ref_bytes = parameter_bytes_read(models[original])
    rows = []
    for name, model in models.items():
        lat = latency[name]
        paired = phase_ratios(lat["runs"], ref["runs"])
        flops = flops_per_token(model, first_token)
        if name == original:
            ref_flops = flops
        rows.append({
            "name": name,
            "kind": "original" if name == original else "release",
            **describe(model),
            "prefill_s_median": lat["prefill_s_median"],
            "prefill_s_spread": lat["prefill_s_spread"],
            "prefill_tokens_per_s_median": lat["prefill_tokens_per_s_median"],
            "decode_s_median": lat["decode_s_median"],
            "decode_s_spread": lat["decode_s_spread"],
            "decode_ms_per_token": lat["decode_s_median"] / tokens * 1e3,
            "decode_tokens_per_s_median": lat["decode_tokens_per_s_median"],
            "decode_ratio": statistics.median(paired["decode"]),
            "decode_ratio_min": min(paired["decode"]),
            "decode_ratio_max": max(paired["decode"]),
            "prefill_ratio": statistics.median(paired["prefill"]),
            "flops_per_token": flops,
            "parameter_bytes_read": parameter_bytes_read(model),
            "weights_bytes": weights_bytes(model),
            "series_feature_bytes_per_token": series_feature_bytes_per_token(model),
            "runs": lat["runs"],
        })
    for row, model in zip(rows, models.values()):
        row["flops_ratio"] = row["flops_per_token"] / ref_flops if ref_flops else None
        row["bytes_ratio"] = row["parameter_bytes_read"] / ref_bytes
        row["term_benchmark"] = layer_term_benchmark(model) if (term_bench and row["kind"] == "release") else None
    return rows


def unique_names(paths: list[Path]) -> list[str]:
    names = [p.name or str(p) for p in paths]
    return [str(p) if names.count(n) > 1 or n == ORIGINAL else n for n, p in zip(names, paths)]


def weight_bytes(directory) -> int:
    """Bytes of a release's (or model directory's) safetensors weights: what loading it puts in memory."""
    return sum(f.stat().st_size for f in Path(directory).glob("*.safetensors"))


def check_bench_memory(releases: list[Path], share: float = 0.9) -> None:
    """bench holds the original and every release in memory at once: refuse, before loading anything, releases
    whose weights together exceed `share` of the available memory (a 16x SmolLM2 release alone is ~18 GB)."""
    available = machine.available_memory()
    sizes = [weight_bytes(r) for r in releases]
    if available is None or sum(sizes) <= share * available:
        return
    biggest = max(range(len(sizes)), key=sizes.__getitem__)
    raise TaylorMLPError(f"these {len(releases)} releases hold {sum(sizes) / 1e9:.1f} GB of weights and bench keeps "
                         f"them all in memory at once; this machine has {available / 1e9:.1f} GB available. Bench "
                         f"fewer releases per run (the largest, {releases[biggest]}, is {sizes[biggest] / 1e9:.1f} GB)")


def load_models(source, releases, device: str = "cpu") -> tuple[dict, dict, object, torch.dtype]:
    """The original (in the releases' dtype) and every release, on `device`, checked to be made from it: ({name:
    model}, {name: path}, the tokenizer, the dtype); the original first, named ORIGINAL."""
    releases = [Path(r) for r in releases]
    if not releases:
        raise TaylorMLPError("give at least one release directory to compare with the original")
    check_bench_memory(releases)
    loaded = {}
    for name, path in zip(unique_names(releases), releases):
        with status(f"loading release {path}"):
            loaded[name] = load_release(path).to(device)
    dtype = release_dtype(releases[0])
    with status(f"loading original {source}"):  # in the releases' dtype: a bf16 release against a bf16 original
        base, tokenizer, base_dir = load_base(source, dtype=dtype)
        base = base.to(device)
    models = {ORIGINAL: base}
    paths = {ORIGINAL: Path(base_dir)}
    for (name, model), path in zip(loaded.items(), releases):
        spec = model.config.taylormlp
        if (spec["hidden_size"] != base.config.hidden_size
                or len(decoder_layers(model)) != len(decoder_layers(base))
                or model.config.vocab_size != base.config.vocab_size):
            raise TaylorMLPError(f"release {path} was not made from {source} (hidden size, layer count or "
                                 f"vocabulary differ): its slowdown against this original would mean nothing")
        models[name] = model
        paths[name] = path
    return models, paths, tokenizer, dtype


def run_bench(source, releases, tokens: int = 32, repeats: int = 3, json_path=None, plot_path=None,
              memory: bool = True, batch_sizes=None, device: str = "cpu", serve: dict | None = None) -> dict:
    """`taylormlp bench`.  `batch_sizes` (--batch-sizes): also the throughput at those batch sizes, timed in the
    same interleaved run as the latency table (batch 1), and --plot then draws slowdown against batch size.
    `device` "cuda": every model is timed on the GPU; the term microbenchmark and the peak-RSS probes, which
    measure the CPU, are left out.  `serve` (--serve-concurrency, --serve-requests, --serve-tokens: the fields of
    serve_bench.ServeOptions): also the throughput through the server, after the in-process models are freed."""
    device = machine.resolve_device(device)
    if serve is not None:
        from . import serve_bench  # imports transformers' serving engine, of the optional serve extra

        serve = serve_bench.ServeOptions(**serve)
        serve_bench.check_serve_options(serve, device)
    if tokens < 1 or repeats < 1:
        raise TaylorMLPError("--tokens and --repeats must be positive")
    if batch_sizes is not None and (not batch_sizes or min(batch_sizes) < 1):
        raise TaylorMLPError(f"--batch-sizes must be whole numbers of at least 1, got {batch_sizes}")
    models, paths, tokenizer, dtype = load_models(source, releases, device)
    base = models[ORIGINAL]
    ids, chat = prompt_ids(tokenizer)
    sizes = ", ".join(map(str, sorted({1, *batch_sizes}))) if batch_sizes else "1"
    log(f"prompt: {ids.shape[1]} tokens{' (chat template)' if chat else ''}; {tokens} decode tokens, "
        f"{repeats} interleaved repeats, batch sizes {sizes}, {torch.get_num_threads()} torch threads")
    timings = bench_timings(models, ids, tokens, repeats, batch_sizes) if batch_sizes else None
    rows = bench_models(models, ids, tokens, repeats, runs=timings[1] if timings else None,
                        term_bench=device == "cpu")
    for row in rows:
        row["path"] = str(paths[row["name"]])
        row["size_bytes"] = release_size(paths[row["name"]])
    models.clear()  # free the in-process copies before the memory probes load them again
    del base
    model = None
    if memory and device == "cpu":
        for row in bar(rows, desc="peak memory (one fresh process per model)", unit="model"):
            kind = "original" if row["kind"] == "original" else "release"
            target = source if kind == "original" else row["path"]
            row["memory"] = memory_probe(kind, target, ids, tokens, dtype=dtype)
    if serve is not None:
        targets = {row["name"]: (row["kind"], str(source) if row["kind"] == "original" else row["path"])
                   for row in rows}
        served = serve_bench.serve_bench(targets, ORIGINAL, PROMPT, chat, int(ids.shape[1]), serve, repeats,
                                         torch.get_num_threads())
    results = {
        "source": str(source),
        "prompt": PROMPT,
        "chat_template": chat,
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": tokens,
        "repeats": repeats,
        "machine": machine.describe(device),
        "models": rows,
    }
    if timings:
        results["batch_sizes"] = sorted(timings)
        results["throughput"] = throughput_rows(timings, ORIGINAL, tokens)
    if serve is not None:
        results["serve"] = served
    print(format_table(results))
    if timings:
        print("\n" + format_throughput(results))
    if serve is not None:
        print("\n" + format_serve(results))
    if json_path is not None:
        json_path = write_text_atomically(Path(json_path), json.dumps(results, indent=1, default=str), "--json")
        log(f"wrote {json_path}")
    if plot_path is not None:
        (plot_throughput if timings else plot_results)(results, plot_path)
        log(f"wrote {plot_path}")
    return results
