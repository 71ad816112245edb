"""`taylormlp bench`: what a release costs next to the original — latency, work, memory and size.

What is measured, and how:

* **Latency** (``measure_decode``): one greedy run = a prefill forward on the prompt (``use_cache=True``)
  followed by exactly ``new_tokens`` single-token decode steps that reuse ``past_key_values`` and take the
  argmax.  It never stops early at EOS, so every model does the same amount of work.  Models are timed
  interleaved (``interleaved_latency``: one warm-up run each, then round robin per repeat, the starting
  model rotated each repeat) so that noise from other work on the machine hits all of them alike; the
  slowdown is the ratio of median decode times, and its range is taken over the per-repeat (paired) ratios.
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
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .errors import TaylorMLPError
from .progress import bar, log, status

PROMPT = "Explain in three sentences why the sky is blue during the day and red at sunset."
ORIGINAL = "original"


# ---------------------------------------------------------------- one run, many runs


def _forward_kwargs(model) -> tuple[dict, str]:
    """Extra forward kwargs (logits for the last position only) and the name of the cache argument
    (``cache`` in recent transformers, ``past_key_values`` before)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    return extra, ("cache" if "cache" in params else "past_key_values")


def _output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def measure_decode(model, input_ids, new_tokens: int) -> dict:
    """Time ONE greedy run: prefill on `input_ids`, then `new_tokens` single-token cached decode steps
    (each reuses the cache returned by the previous forward and feeds back the argmax token).

    Returns {"prefill_s", "decode_s", "decode_tokens_per_s", "prefill_tokens_per_s"} plus "prompt_tokens",
    "new_tokens" and "tokens" (the ids fed back by the decode steps)."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be at least 1, got {new_tokens}")
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        raise ValueError(f"input_ids must be one non-empty sequence, got shape {tuple(ids.shape)}")
    extra, cache_arg = _forward_kwargs(model)
    prompt_len = ids.shape[1]
    mask = torch.ones(1, prompt_len + new_tokens, dtype=torch.long)

    start = time.perf_counter()
    out = model(input_ids=ids, attention_mask=mask[:, :prompt_len], use_cache=True, **extra)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    prefill_s = time.perf_counter() - start

    past = _output_cache(out)
    tokens = []
    start = time.perf_counter()
    for step in range(new_tokens):
        tokens.append(int(nxt))
        out = model(input_ids=nxt, attention_mask=mask[:, :prompt_len + step + 1], use_cache=True,
                    **{cache_arg: past}, **extra)
        past = _output_cache(out)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    decode_s = time.perf_counter() - start
    return {
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "decode_tokens_per_s": new_tokens / decode_s if decode_s > 0 else math.inf,
        "prefill_tokens_per_s": prompt_len / prefill_s if prefill_s > 0 else math.inf,
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
        "tokens": tokens,
    }


def interleaved_latency(models: dict, input_ids, new_tokens: int, repeats: int) -> dict:
    """Time every model `repeats` times, interleaved, after one warm-up run each.

    Each repeat runs every model once (round robin; the first model rotates from repeat to repeat), so
    slow phases of a shared machine fall on all models alike.  Returns per name: "decode_s_median",
    "decode_s_spread" (max − min), "decode_tokens_per_s_median", "prefill_s_median", "prefill_s_spread",
    "runs" (the measure_decode results without token lists)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    names = list(models)
    if not names:
        raise ValueError("no models to time")
    for name in names:  # warm-up: first-call allocations, lazy init, caches
        measure_decode(models[name], input_ids, new_tokens)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for r in bar(range(repeats), desc="timing (interleaved)", unit="repeat"):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            res = measure_decode(models[name], input_ids, new_tokens)
            res.pop("tokens", None)
            runs[name].append(res)
    out = {}
    for name in names:
        decode = [run["decode_s"] for run in runs[name]]
        prefill = [run["prefill_s"] for run in runs[name]]
        out[name] = {
            "decode_s_median": statistics.median(decode),
            "decode_s_spread": max(decode) - min(decode),
            "decode_tokens_per_s_median": statistics.median(run["decode_tokens_per_s"] for run in runs[name]),
            "prefill_s_median": statistics.median(prefill),
            "prefill_s_spread": max(prefill) - min(prefill),
            "prefill_tokens_per_s_median": statistics.median(run["prefill_tokens_per_s"] for run in runs[name]),
            "runs": runs[name],
        }
    return out


# ---------------------------------------------------------------- deterministic work, memory estimates


@torch.no_grad()
def flops_per_token(model, token_id: int = 0) -> int:
    """Matmul FLOPs of one single-token forward (no cache), counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.tensor([[int(token_id)]])
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return int(counter.get_total_flops())


def taylor_mlps(model) -> list:
    from .runtime import TaylorMLP

    return [m for m in model.modules() if isinstance(m, TaylorMLP)]


def weights_bytes(model) -> int:
    params = {id(p): p.numel() * p.element_size() for p in model.parameters()}  # tied weights once
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return int(sum(params.values()) + buffers)


def series_feature_bytes_per_token(model) -> int:
    """Bytes of the largest layer's stacked basis features for one token ((N+1)·P float32 values)."""
    sizes = [(m.order + 1) * m.pieces * 4 for m in taylor_mlps(model)]
    return max(sizes, default=0)


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
    timers = {name: _timer(fn)[0] for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for b in range(blocks):  # interleave blocks of the three, rotating the order
        names = list(fns)
        for k in range(len(names)):
            name = names[(b + k) % len(names)]
            samples[name].append(timers[name]())
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
    kind, path, ids_json, tokens, threads = argv
    import transformers  # noqa: F401  (part of the baseline, as in any user's process)

    from .release import load_release
    from .sources import load_base

    torch.set_num_threads(int(threads))
    base = _maxrss_bytes()
    if kind == "original":
        model = load_base(path)[0]
    else:
        model = load_release(path, verify=False)
    loaded = _maxrss_bytes()
    measure_decode(model, torch.tensor([json.loads(ids_json)]), int(tokens))
    peak = _maxrss_bytes()
    print(json.dumps({"baseline_rss_bytes": base, "rss_after_load_bytes": loaded - base,
                      "rss_peak_bytes": peak - base}))


def memory_probe(kind: str, path, input_ids, tokens: int, timeout: float = 900.0) -> dict:
    ids = torch.as_tensor(input_ids).reshape(-1).tolist()
    code = "import sys; from taylormlp.bench import _memory_probe_main; _memory_probe_main(sys.argv[1:])"
    env = {**os.environ, "TAYLORMLP_QUIET": "1"}
    try:
        proc = subprocess.run([sys.executable, "-c", code, kind, str(path), json.dumps(ids), str(tokens),
                               str(torch.get_num_threads())], capture_output=True, text=True, timeout=timeout,
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
    from .calibration import format_prompt
    from .sources import is_chat_model

    chat = is_chat_model(tokenizer)
    text = format_prompt(tokenizer, prompt, chat)
    add_special = not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=add_special).input_ids
    return ids, chat


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
                 term_bench: bool = True) -> list[dict]:
    """Latency (interleaved), FLOPs, weight bytes and the term microbenchmark for in-memory models.

    `models` maps names to models; `original` names the reference for the ratios."""
    if original not in models:
        raise ValueError(f"the reference model {original!r} is not among {list(models)}")
    latency = interleaved_latency(models, input_ids, tokens, repeats)
    first_token = int(torch.as_tensor(input_ids).reshape(-1)[0])
    ref = latency[original]
    ref_flops = None
    rows = []
    for name, model in models.items():
        lat = latency[name]
        paired = [run["decode_s"] / base["decode_s"] for run, base in zip(lat["runs"], ref["runs"])]
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
            "decode_ratio": lat["decode_s_median"] / ref["decode_s_median"],
            "decode_ratio_min": min(paired),
            "decode_ratio_max": max(paired),
            "prefill_ratio": lat["prefill_s_median"] / ref["prefill_s_median"],
            "flops_per_token": flops,
            "weights_bytes": weights_bytes(model),
            "series_feature_bytes_per_token": series_feature_bytes_per_token(model),
            "runs": lat["runs"],
        })
    for row, model in zip(rows, models.values()):
        row["flops_ratio"] = row["flops_per_token"] / ref_flops if ref_flops else None
        row["term_benchmark"] = layer_term_benchmark(model) if (term_bench and row["kind"] == "release") else None
    return rows


def _unique_names(paths: list[Path]) -> list[str]:
    names = [p.name or str(p) for p in paths]
    return [str(p) if names.count(n) > 1 or n == ORIGINAL else n for n, p in zip(names, paths)]


def weight_bytes(directory) -> int:
    """Bytes of a release's (or model directory's) safetensors weights: what loading it puts in memory."""
    return sum(f.stat().st_size for f in Path(directory).glob("*.safetensors"))


def check_bench_memory(releases: list[Path], share: float = 0.9) -> None:
    """bench holds the original and every release in memory at once: refuse, before loading anything, releases
    whose weights together exceed `share` of the available memory (a 16x SmolLM2 release alone is ~18 GB)."""
    from .stream import available_memory

    available = available_memory()
    sizes = [weight_bytes(r) for r in releases]
    if available is None or sum(sizes) <= share * available:
        return
    biggest = max(range(len(sizes)), key=sizes.__getitem__)
    raise TaylorMLPError(f"these {len(releases)} releases hold {sum(sizes) / 1e9:.1f} GB of weights and bench keeps "
                         f"them all in memory at once; this machine has {available / 1e9:.1f} GB available. Bench "
                         f"fewer releases per run (the largest, {releases[biggest]}, is {sizes[biggest] / 1e9:.1f} GB)")


def run_bench(source, releases, tokens: int = 32, repeats: int = 3, json_path=None, plot_path=None,
              memory: bool = True) -> dict:
    from .release import load_release, release_size
    from .runtime import decoder_layers
    from .sources import load_base

    if tokens < 1 or repeats < 1:
        raise TaylorMLPError("--tokens and --repeats must be positive")
    releases = [Path(r) for r in releases]
    if not releases:
        raise TaylorMLPError("give at least one release directory to compare with the original")
    check_bench_memory(releases)
    with status(f"loading original {source}"):
        base, tokenizer, base_dir = load_base(source)
    models = {ORIGINAL: base}
    paths = {ORIGINAL: Path(base_dir)}
    for name, path in zip(_unique_names(releases), releases):
        with status(f"loading release {path}"):
            model = load_release(path)
        spec = model.config.taylormlp
        if (spec["hidden_size"] != base.config.hidden_size
                or len(decoder_layers(model)) != len(decoder_layers(base))
                or model.config.vocab_size != base.config.vocab_size):
            raise TaylorMLPError(f"release {path} was not made from {source} (hidden size, layer count or "
                                 f"vocabulary differ): its slowdown against this original would mean nothing")
        models[name] = model
        paths[name] = path
    ids, chat = prompt_ids(tokenizer)
    log(f"prompt: {ids.shape[1]} tokens{' (chat template)' if chat else ''}; {tokens} decode tokens, "
        f"{repeats} interleaved repeats, {torch.get_num_threads()} torch threads")
    rows = bench_models(models, ids, tokens, repeats)
    for row in rows:
        row["path"] = str(paths[row["name"]])
        row["size_bytes"] = release_size(paths[row["name"]])
    models.clear()  # free the in-process copies before the memory probes load them again
    del base
    model = None
    if memory:
        for row in bar(rows, desc="peak memory (one fresh process per model)", unit="model"):
            kind = "original" if row["kind"] == "original" else "release"
            target = source if kind == "original" else row["path"]
            row["memory"] = memory_probe(kind, target, ids, tokens)
    results = {
        "source": str(source),
        "prompt": PROMPT,
        "chat_template": chat,
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": tokens,
        "repeats": repeats,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "models": rows,
    }
    print(format_table(results))
    if json_path is not None:
        json_path = Path(json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=1, default=str))
        log(f"wrote {json_path}")
    if plot_path is not None:
        plot_results(results, plot_path)
        log(f"wrote {plot_path}")
    return results


# ---------------------------------------------------------------- output


def _fmt(value, spec: str, none: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return none
    return format(value, spec)


def format_table(results: dict) -> str:
    rows = results["models"]
    head = ["model", "N", "basis", "preset", "cover", "prefill ms", "decode ms/tok", "spread", "tok/s", "slowdown",
            "(range)", "FLOPs x", "peak RSS MB", "weights MB", "size MB"]
    table = [head]
    for r in rows:
        mem = r.get("memory") or {}
        rss = mem.get("rss_peak_bytes")
        table.append([
            r["name"], _fmt(r["order"], "d"), r["basis"] or "-", r["preset"] or "-", _fmt(r["coverage"], ".2f"),
            _fmt(r["prefill_s_median"] * 1e3, ".1f"), _fmt(r["decode_ms_per_token"], ".2f"),
            _fmt(r["decode_s_spread"] / results["new_tokens"] * 1e3, ".2f"),
            _fmt(r["decode_tokens_per_s_median"], ".1f"), _fmt(r["decode_ratio"], ".2f") + "x",
            f"{r['decode_ratio_min']:.2f}-{r['decode_ratio_max']:.2f}", _fmt(r["flops_ratio"], ".2f") + "x",
            _fmt(rss / 2**20 if rss is not None else None, ".0f", "n/a"),
            _fmt(r["weights_bytes"] / 2**20, ".0f"), _fmt(r.get("size_bytes", 0) / 2**20, ".0f"),
        ])
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    lines = [f"{results['source']}: prompt {results['prompt_tokens']} tokens, {results['new_tokens']} decode tokens, "
             f"{results['repeats']} interleaved repeats ({results['machine']['torch_threads']} threads)", ""]
    for k, row in enumerate(table):
        lines.append("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    terms = [r for r in rows if r.get("term_benchmark")]
    if terms:
        lines += ["", "time per series term (one token, the layer with most protected channels):"]
        for r in terms:
            t = r["term_benchmark"]
            lines.append(f"  {r['name']}: layer {t['layer']}, P={t['protected']}, Q={t.get('pieces', t['protected'])}, {t['terms']} terms: TaylorMLP "
                         f"{t['mlp_ms']:.3f} ms, non-series parts {t['overhead_ms']:.3f} ms -> {t['per_term_ms']:.4f} "
                         f"ms per term vs {t['plain_matmul_ms']:.4f} ms for one plain [{t['hidden']}x{t.get('pieces', t['protected'])}]"
                         f" matmul ({t['per_term_vs_matmul']:.2f}x)")
    errors = [f"  {r['name']}: {r['memory']['error']}" for r in rows if (r.get("memory") or {}).get("error")]
    if errors:
        lines += ["", "memory probe problems:", *errors]
    lines += ["", "spread = (max - min) decode ms/tok over repeats. slowdown = median decode time / original's; "
                  "range over paired (same-repeat) ratios. FLOPs x = matmul FLOPs per token / original's. "
                  "peak RSS = fresh process, above its size after imports, load + one run. "
                  "Timings on shared machines vary: compare within one run."]
    return "\n".join(lines)


def _group(row: dict) -> str:
    return f"{row.get('preset') or '?'} / {row.get('basis') or '?'}"


def plot_results(results: dict, path) -> Path:
    """PNG with two panels: decode slowdown vs order, and validation max logit error vs order."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [r for r in results["models"] if r.get("kind") == "release" and r.get("order") is not None]
    groups = sorted({_group(r) for r in rows})
    colors = {g: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(groups)}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for g in groups:
        sel = [r for r in rows if _group(r) == g]
        orders = [r["order"] for r in sel]
        ratio = [r["decode_ratio"] for r in sel]
        lo = [max(r["decode_ratio"] - r.get("decode_ratio_min", r["decode_ratio"]), 0.0) for r in sel]
        hi = [max(r.get("decode_ratio_max", r["decode_ratio"]) - r["decode_ratio"], 0.0) for r in sel]
        ax1.errorbar(orders, ratio, yerr=[lo, hi], fmt="o", capsize=3, color=colors[g], label=g)
        val = [(r["order"], r["validation_max_logit_error"]) for r in sel
               if r.get("validation_max_logit_error") is not None]
        if val:
            ax2.plot([v[0] for v in val], [max(v[1], 1e-12) for v in val], "o", color=colors[g], label=g)
    for r in rows:
        ax1.annotate(r["name"], (r["order"], r["decode_ratio"]), fontsize=7, xytext=(4, 4),
                     textcoords="offset points")
    ax1.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="original")
    from matplotlib.ticker import MaxNLocator

    ax1.set_ylim(bottom=0.0)
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_xlabel("series order N")
    ax1.set_ylabel("decode time / original")
    ax1.set_title(f"decode slowdown ({results.get('new_tokens', '?')} tokens, median)")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("series order N")
    ax2.set_ylabel("max |logit - original logit|")
    ax2.set_title("validation max logit error")
    if any(r.get("validation_max_logit_error") is not None for r in rows):
        ax2.set_yscale("log")
        ax2.legend(fontsize=8)
    else:
        ax2.text(0.5, 0.5, "no validation data in these releases", ha="center", va="center",
                 transform=ax2.transAxes)
    fig.suptitle(str(results.get("source", "")), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
