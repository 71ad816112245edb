"""`taylormlp bench` on an engine's sessions (measure/engines.py): the throttle measured where a release is run.

The original and every release start as sessions of the engine (``engine.rows``: each release on its default path,
and for vLLM a native release once more on its Transformers backend, ``<name> (Transformers backend)``, so that an
owner sees how much of a slowdown is the series and how much the backend), all loaded once and kept.  Then every
batch size and model is timed in interleaved rounds (decode.interleaved), one session busy at a time: B copies of
bench's prompt, or with a workload (--prompt-tokens P --new-tokens G) B distinct prompts of P tokens, decoded
together, greedy, EOS ignored.  The rows are throughput.throughput_rows': per batch size and model the prefill,
decode and request slowdowns (the median of the paired ratios to the original's in the same round, with their
range), tokens/s, TTFT and the inter-token latency.  Beside them, the work model's prediction (cost.py on the models
in float32, in this process): the FLOPs ratio a compute-bound engine would pay, the bytes ratio a memory-bound one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from ..common import machine
from ..common.errors import TaylorMLPError
from ..common.paths import write_text_atomically
from ..common.progress import log
from ..release.directory import load_release
from ..release.sources import load_base, load_tokenizer, resolve_source
from .bench import ORIGINAL, prompt_ids, unique_names
from .cost import flops_per_token, forward_flops, parameter_bytes_read
from .engines import BenchRequest, timed_sessions
from .report import format_throughput, plot_throughput
from .throughput import throughput_rows
from .workload import report_workload, workload_prompts


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


def run_engine_bench(engine, request: BenchRequest, workdir=None) -> dict:
    """bench on `engine` (measure/engines.Engine) as `request` asks; prints the table, writes the JSON and the plot
    where asked, and returns the results."""
    engine.require()
    workload, tokens = request.workload, request.tokens
    if workload is None and tokens < 2:
        raise TaylorMLPError(f"--tokens {tokens}: with --engine {engine.name} at least 2 (one prefill token, then "
                             f"decode steps)")
    source_dir = resolve_source(request.source)
    names = dict(zip(unique_names([Path(r) for r in request.releases]), (Path(r) for r in request.releases)))
    rows = engine.rows(names)
    sizes = sorted({1, *(int(b) for b in request.batch_sizes or (1,))})
    tokenizer = load_tokenizer(source_dir)
    if workload is None:
        ids = prompt_ids(tokenizer)[0][0].tolist()
        batches = {b: [ids] * b for b in sizes}
    else:
        prompts = workload_prompts(tokenizer, workload.prompt_tokens, max(sizes))
        batches, tokens = {b: prompts[:b] for b in sizes}, workload.new_tokens
    length = max(512, len(batches[1][0]) + tokens + 16)  # the prompt and every new token (vLLM's max_model_len)
    log("work model: FLOPs and bytes per decode step (float32, this process) ...")
    work = work_ratios(source_dir, names, batches[1][0] if workload else None)
    own_workdir = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix=f"{engine.name}-bench-"))
    sessions = {}
    try:
        for name, (path, impl) in {ORIGINAL: (source_dir, "auto"), **rows}.items():
            log(f"starting {engine.name} for {name} ({request.dtype}) ...")
            sessions[name] = engine.start(path, workdir / f"{name}.log".replace(" ", "_"), dtype=request.dtype,
                                          max_model_len=length, impl=impl)
        runs = timed_sessions(sessions, batches, tokens, request.repeats, f"timing on {engine.name} (interleaved)")
        info = {name: s.info for name, s in sessions.items()}
    finally:
        for s in sessions.values():
            s.close()
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    timings = {b: {name: runs[(b, name)] for name in [ORIGINAL, *rows]} for b in sizes}
    by_path = {str(p): n for n, p in names.items()}
    results = {"engine": engine.name, **engine.record(), "source": str(request.source), "dtype": request.dtype,
               "new_tokens": tokens, "repeats": request.repeats, "batch_sizes": sizes,
               "prompt_tokens": len(batches[1][0]), "machine": machine.describe(request.device),
               "models": [{"name": ORIGINAL, "kind": "original", "engine_class": info[ORIGINAL].get("model_class")}]
               + [{"name": n, "kind": "release", "path": str(p), "engine_class": info[n].get("model_class"),
                   **work[by_path[str(p)]]} for n, (p, _) in rows.items()]}
    if workload is not None:
        results.update(workload=workload.as_dict(), rows=throughput_rows(timings, ORIGINAL, tokens - 1, workload))
        return report_workload(results, request.json_path, request.plot_path)
    results["throughput"] = throughput_rows(timings, ORIGINAL, tokens - 1)
    print(format_throughput(results).replace("in the run above", f"on {engine.name}"))
    print("\nwork model (float32): " + "; ".join(f"{n} FLOPs {w['flops_ratio']:.2f}x, bytes {w['bytes_ratio']:.2f}x"
                                                 for n, w in work.items()))
    if request.json_path is not None:
        log(f"wrote {write_text_atomically(Path(request.json_path), json.dumps(results, indent=1), '--json')}")
    if request.plot_path is not None:
        log(f"wrote {plot_throughput(results, request.plot_path)}")
    return results
