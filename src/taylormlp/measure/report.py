"""`taylormlp bench`'s output: the table it prints and the plot it writes (bench.run_bench calls both)."""

from __future__ import annotations

import math
from pathlib import Path

from ..common.choices import PHASES
from ..common.paths import write_atomically


def _fmt(value, spec: str, none: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return none
    return format(value, spec)


def format_table(results: dict) -> str:
    rows = results["models"]
    head = ["model", "N", "basis", "preset", "cover", "prefill ms", "decode ms/tok", "spread", "tok/s", "slowdown",
            "(range)", "FLOPs x", "bytes x", "peak RSS MB", "weights MB", "size MB"]
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
            _fmt(r.get("bytes_ratio"), ".2f") + "x",
            _fmt(rss / 2**20 if rss is not None else None, ".0f", "n/a"),
            _fmt(r["weights_bytes"] / 2**20, ".0f"), _fmt(r.get("size_bytes", 0) / 2**20, ".0f"),
        ])
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    lines = [f"{results['source']}: prompt {results['prompt_tokens']} tokens, {results['new_tokens']} decode tokens, "
             f"{results['repeats']} interleaved repeats ({results['machine'].get('threads', '?')} threads)", ""]
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
    lines += ["", "spread = (max - min) decode ms/tok over repeats. slowdown = the median over repeats of decode time / "
                  "the original's in the same repeat (paired ratios), with their range. FLOPs x = matmul FLOPs per token / original's. bytes x = "
                  "parameter bytes read per decoded token / original's. "
                  "peak RSS = fresh process, above its size after imports, load + one run. "
                  "Timings on shared machines vary: compare within one run."]
    return "\n".join(lines)


def _group(row: dict) -> str:
    return f"{row.get('preset') or '?'} / {row.get('basis') or '?'}"


def plot_results(results: dict, path) -> Path:
    """PNG with two panels: decode slowdown vs order, and validation max logit error vs order; written atomically
    (a temporary file beside `path`, renamed into place when complete)."""
    import matplotlib  # matplotlib only when a plot is asked for: slow to import, and bench runs without one

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

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
    return _save(fig, path, str(results.get("source", "")))


def _save(fig, path, title: str) -> Path:
    """Write `fig` to `path` atomically (a temporary file beside it, renamed into place when complete)."""
    import matplotlib  # imported by the caller already (plot_results / plot_throughput)
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    # the format is given: a path without a suffix has a temporary name with one (".tmp-<pid>")
    fmt = path.suffix[1:].lower() or matplotlib.rcParams["savefig.format"]
    try:
        write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format=fmt), "--plot")
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------- --batch-sizes


def _columns(table: list[list[str]]) -> list[str]:
    """A table's lines: the header, a rule, then the rows; the second column (the model) left-aligned, the others
    right-aligned."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = []
    for k, row in enumerate(table):
        lines.append("  ".join(c.rjust(w) if i != 1 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def format_throughput(results: dict) -> str:
    """The throughput table of `bench --batch-sizes`: per batch size and model."""
    head = ["batch", "model", "tok/s (batch)", "slowdown", "(range)", "TTFT ms", "inter-token ms"]
    table = [head] + [[str(r["batch"]), r["name"], _fmt(r["decode_tokens_per_s"], ".1f"),
                       _fmt(r["slowdown"], ".2f") + "x", f"{r['slowdown_min']:.2f}-{r['slowdown_max']:.2f}",
                       _fmt(r["ttft_ms"], ".1f"), _fmt(r["inter_token_ms"], ".2f")] for r in results["throughput"]]
    lines = [f"throughput at batch sizes {', '.join(map(str, results['batch_sizes']))} (B copies of the prompt decoded "
             f"together; every batch size and model interleaved in the run above):", ""]
    lines += _columns(table)
    lines += ["", "tok/s = decode tokens per second over the whole batch (at the median decode time). slowdown = the "
                  "median over rounds of decode time / the original's at the same batch in the same round (the "
                  "original's throughput / this one's), with the range of those paired ratios. "
                  "TTFT = the batch's prefill to its first tokens; inter-token = one decode step (a token for every "
                  "sequence)."]
    return "\n".join(lines)


def plot_throughput(results: dict, path) -> Path:
    """PNG of decode slowdown against batch size, one line per release (range: paired ratios), with its FLOPs and
    bytes ratios as dotted levels; written atomically."""
    import matplotlib  # as in plot_results: only when a plot is asked for

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    models = {r["name"]: r for r in results["models"]}
    names = [name for name, r in models.items() if r.get("kind") == "release"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, name in enumerate(names):
        color = plt.get_cmap("tab10")(i % 10)
        rows = [r for r in results["throughput"] if r["name"] == name]
        x = [r["batch"] for r in rows]
        y = [r["slowdown"] for r in rows]
        err = [[max(r["slowdown"] - r["slowdown_min"], 0.0) for r in rows],
               [max(r["slowdown_max"] - r["slowdown"], 0.0) for r in rows]]
        ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, color=color, label=f"{name} (measured)")
        for key, style, what in (("flops_ratio", ":", "FLOPs"), ("bytes_ratio", "--", "bytes")):
            if models[name].get(key):
                ax.axhline(models[name][key], color=color, linestyle=style, linewidth=1,
                           label=f"{name}: {what} ratio {models[name][key]:.2f}x")
    ax.axhline(1.0, color="grey", linestyle="-", linewidth=1, label="original")
    ax.set_xscale("log", base=2)
    ax.set_xticks(results["batch_sizes"], [str(b) for b in results["batch_sizes"]])
    ax.set_ylim(bottom=0.0)
    ax.set_xlabel("batch size (sequences decoded together)")
    ax.set_ylabel("decode time / original's = throughput ratio")
    ax.set_title(f"slowdown against batch size ({results.get('new_tokens', '?')} tokens, median)")
    ax.legend(fontsize=7)
    return _save(fig, path, str(results.get("source", "")))


# ---------------------------------------------------------------- --serve-concurrency


def format_serve(results: dict) -> str:
    """The server-mode table of `bench --serve-concurrency`: per concurrency and model."""
    serve = results["serve"]
    head = ["clients", "model", "req/s", "tok/s (all)", "slowdown", "(range)", "TTFT ms", "inter-token ms",
            "tok/req", "in flight"]
    table = [head] + [[str(r["concurrency"]), r["name"], _fmt(r["requests_per_s"], ".2f"),
                       _fmt(r["output_tokens_per_s"], ".1f"), _fmt(r["slowdown"], ".2f") + "x",
                       f"{r['slowdown_min']:.2f}-{r['slowdown_max']:.2f}", _fmt(r["ttft_ms"], ".1f"),
                       _fmt(r["inter_token_ms"], ".2f"),
                       f"{r['tokens_per_request']:g}/{r['tokens_requested_per_request']:g}",
                       str(r["peak_in_flight"])] for r in serve["rows"]]
    lines = [f"through the server ({serve['endpoint']} endpoint, continuous batching, one process per model, "
             f"{serve['server_threads']} threads each) at concurrency {', '.join(map(str, serve['concurrency']))}: "
             f"{serve['requests_per_client']} streamed greedy request(s) per client per run, {serve['max_tokens']} "
             f"tokens each (EOS ignored), {serve['repeats']} interleaved repeats:", ""]
    lines += _columns(table)
    lines += ["", "req/s, tok/s = requests and output tokens per second over all clients (the run's wall time), "
                  "median over repeats. slowdown = the original's tok/s / this one's, median of same-repeat ratios, "
                  "range over them. TTFT = request sent to its first streamed text; inter-token = (last text - first "
                  "text) / (tokens - 1); medians. tok/req = tokens produced / requested per request. in flight = "
                  "the fewest requests seen in flight at once at a run's peak."]
    return "\n".join(lines)


# ---------------------------------------------------------------- --prompt-tokens P --new-tokens G


def format_workload(results: dict) -> str:
    """The table of `bench --prompt-tokens P --new-tokens G`: per batch size and model, the three phases' times and
    slowdowns (measure/workload.py), then each release's FLOPs ratios."""
    w = results["workload"]
    head = ["batch", "model", "TTFT ms", "prefill", "decode ms", "decode", "request ms", "request", "(range)",
            "tok/s (batch)"]
    table = [head] + [[str(r["batch"]), r["name"], _fmt(r["prefill_s"] * 1e3, ".1f"),
                       _fmt(r["prefill_slowdown"], ".2f") + "x", _fmt(r["decode_s"] * 1e3, ".1f"),
                       _fmt(r["decode_slowdown"], ".2f") + "x", _fmt(r["request_s"] * 1e3, ".1f"),
                       _fmt(r["request_slowdown"], ".2f") + "x",
                       f"{r['request_slowdown_min']:.2f}-{r['request_slowdown_max']:.2f}",
                       _fmt(r["request_tokens_per_s"], ".1f")] for r in results["rows"]]
    lines = [f"workload {w['prompt_tokens']}:{w['new_tokens']} on {results.get('engine', 'taylormlp')} (B distinct "
             f"prompts of {w['prompt_tokens']} tokens, {w['new_tokens']} generated tokens each, decoded together; "
             f"every batch size and model interleaved, {results['repeats']} rounds):", ""]
    lines += _columns(table)
    lines += ["", "prefill = time to first token (the prompt's forward); decode = the other generated tokens; request "
                  "= both. Each slowdown = the median over rounds of this model's time / the original's in the same "
                  "round (range: the request's). tok/s = generated tokens per second of request time, whole batch."]
    for m in results["models"]:
        if m.get("kind") == "release" and m.get("flops_ratio"):
            lines.append(f"{m['name']}: FLOPs ratio {m['flops_ratio']:.2f}x per decode step, "
                         f"{m['prefill_flops_ratio']:.2f}x on the prefill")
    return "\n".join(lines)


def plot_workload(results: dict, path) -> Path:
    """PNG, one panel per release: prefill, decode and request slowdown against batch size (range: paired ratios),
    with the FLOPs ratios as dotted levels; written atomically."""
    import matplotlib  # as in plot_results: only when a plot is asked for

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    releases = [m for m in results["models"] if m.get("kind") == "release"]
    fig, axes = plt.subplots(1, len(releases), figsize=(5.2 * len(releases), 4.0), squeeze=False)
    for ax, model in zip(axes[0], releases):
        rows = [r for r in results["rows"] if r["name"] == model["name"]]
        x = [r["batch"] for r in rows]
        for i, phase in enumerate(PHASES):
            y = [r[f"{phase}_slowdown"] for r in rows]
            err = [[max(r[f"{phase}_slowdown"] - r[f"{phase}_slowdown_min"], 0.0) for r in rows],
                   [max(r[f"{phase}_slowdown_max"] - r[f"{phase}_slowdown"], 0.0) for r in rows]]
            ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, color=plt.get_cmap("tab10")(i), label=phase)
        for key, style, what in (("prefill_flops_ratio", ":", "prefill FLOPs"), ("flops_ratio", "--", "decode FLOPs")):
            if model.get(key):
                ax.axhline(model[key], color="grey", linestyle=style, linewidth=1,
                           label=f"{what} ratio {model[key]:.2f}x")
        ax.set_xscale("log", base=2)
        ax.set_xticks(results["batch_sizes"], [str(b) for b in results["batch_sizes"]])
        ax.set_ylim(bottom=0.0)
        ax.set_xlabel("batch size (distinct prompts together)")
        ax.set_ylabel("time / original's (median of paired ratios)")
        ax.set_title(model["name"], fontsize=9)
        ax.legend(fontsize=7)
    w = results["workload"]
    return _save(fig, path, f"{results.get('source', '')}: workload {w['prompt_tokens']}:{w['new_tokens']} on "
                            f"{results.get('engine', 'taylormlp')}")
