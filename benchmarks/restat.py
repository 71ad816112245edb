"""Recompute the slowdown figures of results/ files that bench wrote before 8e777f6 with the one statistic.

Before that commit our runtime's bench reported its latency table's decode and prefill slowdowns, and the rows of
`--batch-sizes`, as ratios of medians (the median release time over the median original time).  Every slowdown is
now the median of the per-round paired ratios (decode.phase_ratios: the release's time over the original's in the
same interleaved round), with their range.  The files kept every round's run, so the figures are recomputed from
them, by the code bench runs today (bench_models' statistic, throughput.throughput_rows), without timing anything:

    python benchmarks/restat.py                 # the files listed in FILES, rewritten in place; changes printed
    python benchmarks/restat.py --check         # exit status 1 if any file's figures are not the one statistic

Each rewritten file records "statistic"; the plot bench drew beside it is drawn again.  vLLM's bench files
need nothing: they were paired medians when written (vllm_bench.py) and keep no runs to recompute from.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from taylormlp.measure.decode import phase_ratios
from taylormlp.measure.report import plot_results, plot_throughput
from taylormlp.measure.throughput import throughput_rows

ROOT = Path(__file__).resolve().parents[1]
FILES = ["bench-smollm2.json", "bench-batch-smollm2.json", "bench-smollm2-4x.json", "bench-smollm2-slow4-b32.json",
         "bench-slowdown.json", "bench-slowdown-pair.json", "bench-slowdown-16.json", "serve-bench-smollm2.json"]
STATISTIC = "median of per-round paired ratios"
LATENCY = ("decode_ratio", "decode_ratio_min", "decode_ratio_max", "prefill_ratio")
ROW = ("slowdown", "slowdown_min", "slowdown_max")


def latency_figures(models: list[dict]) -> dict[str, dict]:
    """Per model of a latency table: its slowdowns from its runs against the original's (bench_models' statistic)."""
    original = next(m for m in models if m["kind"] == "original")
    out = {}
    for m in models:
        paired = phase_ratios(m["runs"], original["runs"])
        out[m["name"]] = {"decode_ratio": statistics.median(paired["decode"]),
                          "decode_ratio_min": min(paired["decode"]), "decode_ratio_max": max(paired["decode"]),
                          "prefill_ratio": statistics.median(paired["prefill"])}
    return out


def throughput_figures(rows: list[dict]) -> list[dict]:
    """The rows again, built by throughput.throughput_rows from their own runs."""
    original = next(r["name"] for r in rows if r["kind"] == "original")
    timings: dict = {}
    for r in rows:
        timings.setdefault(r["batch"], {})[r["name"]] = r["runs"]
    return throughput_rows(timings, original, rows[0]["new_tokens"])


def restat(results: dict) -> list[str]:
    """Rewrite `results`' slowdown figures in place; the changes, as lines 'where: old -> new'."""
    changes = []
    if any("runs" in m for m in results.get("models", [])):
        figures = latency_figures(results["models"])
        for m in results["models"]:
            for key, new in figures[m["name"]].items():
                if not math.isclose(m.get(key, math.nan), new, rel_tol=1e-12):
                    changes.append(f"{m['name']} {key}: {m.get(key)} -> {new}")
                m[key] = new
    if results.get("throughput"):
        new_rows = throughput_figures(results["throughput"])
        for old, new in zip(results["throughput"], new_rows):
            for key in ROW:
                if not math.isclose(old[key], new[key], rel_tol=1e-12):
                    changes.append(f"batch {old['batch']} {old['name']} {key}: {old[key]} -> {new[key]}")
        results["throughput"] = new_rows
    results["statistic"] = STATISTIC
    return changes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", help=f"results files (default: {', '.join(FILES)})")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file's figures would change")
    args = p.parse_args(argv)
    stale = False
    for name in args.files or FILES:
        path = Path(name) if args.files else ROOT / "results" / name
        results = json.loads(path.read_text())
        changes = restat(results)
        stale |= bool(changes)
        print(f"{path.name}: {len(changes)} figures {'differ' if args.check else 'recomputed'}")
        for line in changes:
            print("   " + line)
        if args.check:
            continue
        path.write_text(json.dumps(results, indent=1))
        plot = path.with_suffix(".png")
        if plot.is_file():  # bench's plot: the rows' (--batch-sizes), else the latency table's
            print(f"   redrew {(plot_throughput if results.get('throughput') else plot_results)(results, plot)}")
    return int(stale and args.check)


if __name__ == "__main__":
    sys.exit(main())
