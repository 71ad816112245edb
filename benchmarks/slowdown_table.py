"""Issue 10's table: `protect --slowdown X` for several X on one model, each release measured again,
independently, by `taylormlp bench` (all releases interleaved with the original in one run), and compared with
the original on the held-out prompts.

    .venv/bin/python benchmarks/slowdown_table.py --targets 1.25 1.5 2 3 4 8 16
    .venv/bin/python benchmarks/slowdown_table.py --targets 1.5 8          # the acceptance pair

Writes results/slowdown-table.{json,md} and results/slowdown.png (measured against requested), bench runs as
results/bench-slowdown*.json, held-out comparisons as results/compare-slowdown-<X>.json.  Releases go under
releases/; a release, its bench and its comparison are reused when present and newer than the release (--force:
everything again).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from taylormlp.measure.bench import weight_bytes
from taylormlp.common.machine import available_memory

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def bench_rows(results: Path) -> dict:
    """Release path -> (bench row, when measured) from every results/bench-slowdown*.json (the newest wins)."""
    rows = {}
    for path in sorted(results.glob("bench-slowdown*.json"), key=lambda f: f.stat().st_mtime):
        for r in json.loads(path.read_text()).get("models", []):
            if r.get("kind") == "release" and r.get("path"):
                rows[str(Path(r["path"]).resolve())] = (r, path.stat().st_mtime)
    return rows


def bench_releases(taylormlp: str, args, releases: list[Path]) -> dict:
    """`taylormlp bench` (each release interleaved with the original in one run) for the releases without a bench
    newer than themselves (all with --force).  bench holds the original and its releases in memory together, so
    releases are benched in groups that fit into 80% of the available memory (a 16x SmolLM2 release alone is
    ~18 GB); each group's run is kept as results/bench-slowdown-<targets>.json."""
    known = bench_rows(args.results)
    todo = [out for out in releases if args.force or str(out.resolve()) not in known
            or known[str(out.resolve())][1] <= (out / "config.json").stat().st_mtime]
    original = min(weight_bytes(out) for out in releases) if releases else 0  # no release is smaller
    budget = 0.8 * (available_memory() or 0) - original
    groups, group, used = [], [], 0
    for out in todo:
        size = weight_bytes(out)
        if group and used + size > budget:
            groups.append(group)
            group, used = [], 0
        group.append(out)
        used += size
    if group:
        groups.append(group)
    for group in groups:
        name = "-".join(out.name.rsplit("-", 1)[-1] for out in group)
        run([taylormlp, "bench", args.source, *map(str, group), "--tokens", str(args.tokens), "--repeats",
             str(args.repeats), "--json", str(args.results / f"bench-slowdown-{name}.json"), "--force"])
    return {path: row for path, (row, _) in bench_rows(args.results).items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="smollm2-135m-instruct")
    parser.add_argument("--targets", type=float, nargs="+", default=[1.25, 1.5, 2, 3, 4, 8, 16])
    parser.add_argument("--prompts", default="benchmarks/prompts_smollm2.json")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--force", action="store_true", help="re-protect even if a release exists")
    parser.add_argument("--skip-compare", action="store_true")
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw results/slowdown.png from results/slowdown-table.json; measure nothing")
    parser.add_argument("--table-only", action="store_true",
                        help="rebuild results/slowdown-table.{json,md} and slowdown.png from the stored rows and the "
                             "bench-slowdown*.json runs (e.g. after benchmarks/restat.py); measure nothing")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads((args.results / "slowdown-table.json").read_text()), args.results / "slowdown.png")
        return 0
    if args.table_only:
        stored = json.loads((args.results / "slowdown-table.json").read_text())
        rows = [r for r in stored if "protect_measured" in r]
        by_path = {path: row for path, (row, _) in bench_rows(args.results).items()}
        for row in rows:
            bench_columns(row, by_path.get(str((ROOT / row["release"]).resolve()), {}))
        write_table(rows, [r for r in stored if "protect_measured" not in r], args.results)
        return 0
    taylormlp = str(BIN / "taylormlp")
    rows = []
    releases = []
    unreachable = []
    times_json = args.results / "slowdown-protect-seconds.json"  # written after every protect: survives a stop
    times = json.loads(times_json.read_text()) if times_json.is_file() else {}
    for x in args.targets:
        out = ROOT / "releases" / f"{args.source}-slowdown-{x:g}"
        start = time.perf_counter()
        if args.force or not (out / "taylormlp_manifest.json").is_file():
            print("+ protect --slowdown", x, flush=True)
            done = subprocess.run([taylormlp, "protect", args.source, "--slowdown", f"{x:g}", "--out", str(out),
                                   "--force"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
            sys.stderr.write(done.stderr[-2000:])
            if done.returncode:  # an unreachable target is a row that says why, not the end of the table
                lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
                unreachable.append({"requested": x, "error": lines[-1] if lines else f"exit {done.returncode}"})
                continue
            elapsed = time.perf_counter() - start
            times[str(out.relative_to(ROOT))] = elapsed
            args.results.mkdir(parents=True, exist_ok=True)
            times_json.write_text(json.dumps(times, indent=1))
        else:  # a reused release keeps the protect time measured when it was made (if this table saw it)
            elapsed = times.get(str(out.relative_to(ROOT)))
        spec = json.loads((out / "config.json").read_text())["taylormlp"]
        P = sum(r["protected"] for r in spec["layers"])
        Q = sum(r.get("pieces", r["protected"]) for r in spec["layers"])
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        rows.append({"requested": x, "release": str(out.relative_to(ROOT)), "coverage": spec["coverage"],
                     "order": spec["order"], "pieces_per_channel": Q / P if P else None,
                     "family": spec["slowdown"].get("family"), "protect_measured": spec["slowdown"]["measured"],
                     "protect_flops_ratio": spec["slowdown"].get("flops_ratio"), "size_bytes": size,
                     "protect_seconds": elapsed, "machine": spec["slowdown"].get("machine")})
        releases.append(out)
    args.results.mkdir(parents=True, exist_ok=True)
    by_path = bench_releases(taylormlp, args, releases)
    for row, out in zip(rows, releases):
        bench_columns(row, by_path.get(str(out.resolve()), {}))
        cmp_json = args.results / f"compare-slowdown-{row['requested']:g}.json"
        fresh = cmp_json.is_file() and cmp_json.stat().st_mtime > (out / "config.json").stat().st_mtime
        if not args.skip_compare and not fresh:  # a comparison newer than its release is reused
            run([taylormlp, "compare", args.source, str(out), "--prompts", args.prompts, "--json", str(cmp_json),
                 "--force"])
        if cmp_json.is_file() and cmp_json.stat().st_mtime > (out / "config.json").stat().st_mtime:
            c = json.loads(cmp_json.read_text())
            row["held_out"] = f"{c['identical']}/{len(c['rows'])}"
    write_table(rows, unreachable, args.results)
    return 0


def bench_columns(row: dict, b: dict) -> None:
    """The table's bench columns from the release's bench row (its latency table: decode slowdown and range)."""
    row["bench_measured"] = b.get("decode_ratio")
    row["bench_range"] = [b.get("decode_ratio_min"), b.get("decode_ratio_max")]
    row["bench_flops_ratio"] = b.get("flops_ratio")


def write_table(rows: list[dict], unreachable: list[dict], results: Path) -> None:
    """results/slowdown-table.json and .md, and the plot."""
    (results / "slowdown-table.json").write_text(json.dumps(rows + unreachable, indent=1))
    lines = ["| requested | family | coverage | N | pieces/channel | measured by protect | measured by bench (range) | "
             "FLOPs ratio | release size | held-out identical | protect time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        bm = r.get("bench_measured")
        rng = r.get("bench_range") or [None, None]
        bench_txt = f"{bm:.2f}x ({rng[0]:.2f}-{rng[1]:.2f})" if bm and rng[0] else "-"
        pieces = f"{r['pieces_per_channel']:.2f}" if r["pieces_per_channel"] else "-"
        flops = r.get("bench_flops_ratio") or r.get("protect_flops_ratio")
        took = f"{r['protect_seconds'] / 60:.1f} min" if r.get("protect_seconds") else "-"
        lines.append(f"| {r['requested']:g}x | {r['family']} | {r['coverage']:.3f} | {r['order']} | {pieces} | "
                     f"{r['protect_measured']:.2f}x | {bench_txt} | {flops:.2f}x | {r['size_bytes'] / 1e6:.0f} MB | "
                     f"{r.get('held_out', '-')} | {took} |")
    for r in unreachable:
        lines.append(f"| {r['requested']:g}x | not written: {r['error']} |" + " |" * 9)
    table = "\n".join(lines)
    (results / "slowdown-table.md").write_text(table + "\n")
    print(table)
    plot(rows, results / "slowdown.png")


def plot(rows: list[dict], path: Path) -> None:
    """Measured against requested slowdown (log axes labelled with the requested values)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    rows = [r for r in rows if "protect_measured" in r]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    xs = [r["requested"] for r in rows]
    ax.plot(xs, xs, "k--", lw=1, label="requested")
    ax.fill_between(xs, [x * 0.9 for x in xs], [x * 1.1 for x in xs], color="0.9", label="±10%")
    ax.plot(xs, [r["protect_measured"] for r in rows], "o-", label="measured by protect")
    ax.plot(xs, [r.get("bench_measured") or float("nan") for r in rows], "s-", label="measured by bench")
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # after set_scale, which resets the locators
        axis.set_major_locator(FixedLocator(xs))
        axis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{x:g}x" for x in xs], rotation=45)
    ax.set_yticklabels([f"{x:g}x" for x in xs])
    ax.set_xlabel("requested slowdown")
    ax.set_ylabel("decode latency ratio against the original")
    ax.grid(True, lw=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
