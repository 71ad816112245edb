"""`taylormlp bench --engine vllm`: the throttle measured where large-scale use runs, on vLLM.

The original runs on vLLM's own model code, each release on the path vLLM takes by default (vllm_engine: natively
through taylormlp's plugin for Llama, Mistral and Qwen2, else the Transformers backend with its two settings); a native
release is also run on the Transformers backend, as one more row (``<name> (Transformers backend)``), so that an owner
sees how much of a slowdown is the series and how much the backend.  Each model runs in a process of its own
(vllm_engine.EngineWorker: the engine in that process, VLLM_ENABLE_V1_MULTIPROCESSING=0), all loaded once and kept.  Then every batch size and model is timed in
interleaved rounds (decode.interleaved), one engine busy at a time: B copies of bench's prompt decoded together,
greedy, EOS ignored.  Per batch size and model: tokens/s over the batch, the slowdown (decode time over the original's
in the same round: median and range of the paired ratios), TTFT (the batch's prefill and first token) and the
inter-token latency.  Beside them, the work model's prediction (bench.flops_per_token, bench.parameter_bytes_read on
the models in float32): the FLOPs ratio a compute-bound engine would pay, the bytes ratio a memory-bound one.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from ..common.errors import TaylorMLPError
from ..common.paths import write_text_atomically
from ..common.progress import log
from ..release.directory import load_release
from ..release.sources import load_base, load_tokenizer, resolve_source
from ..serve.vllm_engine import TRANSFORMERS_FLAGS, EngineWorker, is_native, require_vllm
from .bench import ORIGINAL, prompt_ids
from .cost import flops_per_token, forward_flops, parameter_bytes_read
from .decode import interleaved, paired_ratios
from .report import format_throughput, plot_throughput
from .workload import Workload, report_workload, workload_prompts, workload_rows

BACKEND = " (Transformers backend)"  # the row of a native release run on vLLM's Transformers backend


def engine_runs(releases: dict) -> dict[str, tuple]:
    """{row name: (release path, vLLM path)}: each release on its default path ("auto"), and a native one also on
    the Transformers backend."""
    runs = {}
    for name, path in releases.items():
        runs[name] = (path, "auto")
        if is_native(path):
            runs[name + BACKEND] = (path, "transformers")
    return runs


def work_ratios(source, releases: dict, prompt: list[int] | None = None) -> dict[str, dict]:
    """Per release: FLOPs and parameter bytes of one decode step over the original's (float32, in this process), and
    with a workload's `prompt` the FLOPs of its prefill over the original's."""
    base = load_base(source)[0]
    flops, bytes_read = flops_per_token(base), parameter_bytes_read(base)
    prefill = forward_flops(base, prompt) if prompt else None
    del base
    out = {}
    for name, path in releases.items():
        model = load_release(path)
        out[name] = {"flops_ratio": flops_per_token(model) / flops,
                     "bytes_ratio": parameter_bytes_read(model) / bytes_read}
        if prompt:
            out[name]["prefill_flops_ratio"] = forward_flops(model, prompt) / prefill
        del model
    return out


def summarize(runs: dict, batch_sizes, names, tokens: int) -> list[dict]:
    """Rows per batch size and model from the timed runs: medians, paired slowdowns against the original."""
    rows = []
    for b in batch_sizes:
        for name in names:
            mine, base = runs[(b, name)], runs[(b, ORIGINAL)]
            ratios = paired_ratios(mine, base, "decode_s")
            decode = statistics.median(r["decode_s"] for r in mine)
            rows.append({"batch": b, "name": name, "decode_s": decode,
                         "decode_tokens_per_s": b * (tokens - 1) / decode,
                         "slowdown": statistics.median(ratios), "slowdown_min": min(ratios),
                         "slowdown_max": max(ratios),
                         "ttft_ms": 1e3 * statistics.median(r["prefill_s"] for r in mine),
                         "inter_token_ms": 1e3 * statistics.median(r["inter_token_s"] for r in mine)})
    return rows


def run_vllm_bench(source, releases, batch_sizes=(1,), tokens: int = 32, repeats: int = 3, dtype: str = "auto",
                   json_path=None, plot_path=None, workdir=None, workload: Workload | None = None) -> dict:
    """`taylormlp bench --engine vllm`: B copies of bench's prompt, `tokens` tokens each; with a `workload`
    (--prompt-tokens P --new-tokens G) B distinct prompts of P tokens, G tokens each, and the workload's three
    slowdowns (measure/workload.py)."""
    require_vllm()
    if tokens < 2:
        raise TaylorMLPError(f"--tokens {tokens}: with --engine vllm at least 2 (one prefill token, then decode steps)")
    source_dir = resolve_source(source)
    names = {Path(r).name: Path(r) for r in releases}
    rows = engine_runs(names)
    sizes = sorted(set(int(b) for b in batch_sizes) | {1})
    tokenizer = load_tokenizer(source_dir)
    if workload is None:
        ids = prompt_ids(tokenizer)[0][0].tolist()
        batches = {b: [ids] * b for b in sizes}
    else:
        prompts = workload_prompts(tokenizer, workload.prompt_tokens, max(sizes))
        batches, tokens = {b: prompts[:b] for b in sizes}, workload.new_tokens
    length = max(512, len(batches[1][0]) + tokens + 16)  # vLLM's max_model_len: the prompt and every new token
    log("work model: FLOPs and bytes per decode step (float32, this process) ...")
    work = work_ratios(source_dir, names, batches[1][0] if workload else None)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="vllm-bench-"))
    workers = {}
    try:
        for name, (path, impl) in {ORIGINAL: (source_dir, "auto"), **rows}.items():
            log(f"starting vLLM for {name} ({dtype}; compiled) ...")
            workers[name] = EngineWorker(path, workdir / f"{name}.log".replace(" ", "_"), dtype=dtype, impl=impl,
                                         max_model_len=length)
        runs = interleaved({(b, name): (lambda w=w, b=b: w.run(batches[b], tokens)) for b in sizes
                            for name, w in workers.items()}, repeats, "timing on vLLM (interleaved)")
        workers_class = {name: w.ready.get("model_class") for name, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
    results = {"engine": "vllm", "source": str(source), "dtype": dtype, "new_tokens": tokens, "repeats": repeats,
               "batch_sizes": sizes, "transformers_flags": TRANSFORMERS_FLAGS, "prompt_tokens": len(batches[1][0]),
               "models": [{"name": ORIGINAL, "kind": "original", "vllm_class": workers_class.get(ORIGINAL)}]
               + [{"name": n, "kind": "release", "path": str(p), "vllm_class": workers_class.get(n),
                   **work[n.removesuffix(BACKEND)]} for n, (p, _) in rows.items()]}
    if workload is not None:
        by_batch = {b: {name: runs[(b, name)] for name in [ORIGINAL, *rows]} for b in sizes}
        return report_workload({**results, "workload": workload.as_dict(),
                                "rows": workload_rows(by_batch, ORIGINAL, workload)}, json_path, plot_path)
    results["throughput"] = summarize(runs, sizes, [ORIGINAL, *rows], tokens)
    print(format_throughput(results).replace("in the run above", "on vLLM, one process per model"))
    print("\nwork model (float32): " + "; ".join(f"{n} FLOPs {w['flops_ratio']:.2f}x, bytes {w['bytes_ratio']:.2f}x"
                                                 for n, w in work.items()))
    if json_path is not None:
        log(f"wrote {write_text_atomically(Path(json_path), json.dumps(results, indent=1), '--json')}")
    if plot_path is not None:
        log(f"wrote {plot_throughput(results, plot_path)}")
    return results
