"""`taylormlp bench`: timing helpers, the FLOP count that shows the throttle is series work, the plot."""

import copy
import math
import os

os.environ["TAYLORMLP_QUIET"] = "1"

import pytest
import torch

from taylormlp.measure import bench  # noqa: E402
from taylormlp.protection.calibration import collect_ranges  # noqa: E402
from taylormlp.protection.options import ProtectOptions  # noqa: E402
from taylormlp.protection.protector import Protector  # noqa: E402
from taylormlp.common.errors import TaylorMLPError  # noqa: E402
from taylormlp.runtime import TaylorMLP  # noqa: E402

from conftest import tiny_llama  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: torch on one thread for this module


@pytest.fixture(scope="module")
def base_and_ranges():
    model = tiny_llama()
    gen = torch.Generator().manual_seed(1)
    ranges = collect_ranges(model, [torch.randint(0, 128, (20,), generator=gen) for _ in range(4)])
    return model, ranges


def protected_copy(base, ranges, order=8, basis="chebyshev", preset="default", max_pieces=1):
    model = copy.deepcopy(base)
    p = Protector(model, ranges, ProtectOptions(preset=preset, basis=basis, order=order, coverage=1.0,
                                                max_pieces=max_pieces).resolved())
    p.apply(1.0)
    model.config.taylormlp = {"order": order, "basis": basis, "coverage": 1.0, "preset": preset,
                              "validation": {"max_logit_error": 0.01 * order, "tokens_matched": 10, "tokens": 10}}
    return model


@pytest.fixture(scope="module")
def models(base_and_ranges):
    base, ranges = base_and_ranges
    return {"original": base, "n8": protected_copy(base, ranges, 8)}


PROMPT = torch.tensor([[1, 5, 9, 17, 33, 2, 64]])


def test_measure_decode_positive_finite_and_exact_step_count(models):
    model = models["n8"]
    assert all(isinstance(layer.mlp, TaylorMLP) for layer in model.model.layers)
    calls = []
    handle = model.register_forward_hook(lambda _m, _i, _o: calls.append(1))
    try:
        res = bench.measure_decode(model, PROMPT, 5)
    finally:
        handle.remove()
    for key in ("prefill_s", "decode_s", "decode_tokens_per_s", "prefill_tokens_per_s"):
        assert math.isfinite(res[key]) and res[key] > 0, key
    assert len(calls) == 1 + 5  # one prefill, exactly new_tokens decode steps
    assert len(res["tokens"]) == 5 and res["new_tokens"] == 5 and res["prompt_tokens"] == PROMPT.shape[1]
    assert res["decode_tokens_per_s"] == pytest.approx(5 / res["decode_s"])


def test_measure_decode_is_greedy_and_matches_generate(models):
    model = models["original"]
    res = bench.measure_decode(model, PROMPT[0], 4)  # 1-D ids accepted too
    out = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=5, do_sample=False,
                         pad_token_id=0)
    # the decode steps are fed the greedy tokens 1..new_tokens of the continuation
    assert res["tokens"] == out[0, PROMPT.shape[1]:PROMPT.shape[1] + 4].tolist()


def test_measure_decode_rejects_zero_tokens(models):
    with pytest.raises(ValueError):
        bench.measure_decode(models["original"], PROMPT, 0)


def test_interleaved_latency_returns_every_model_with_repeats(models):
    res = bench.interleaved_latency(models, PROMPT, 3, repeats=2)
    assert set(res) == set(models)
    for stats in res.values():
        assert len(stats["runs"]) == 2
        assert stats["decode_s_median"] > 0 and stats["prefill_s_median"] > 0
        assert stats["decode_s_spread"] >= 0 and stats["decode_tokens_per_s_median"] > 0
        assert stats["decode_s_spread"] == pytest.approx(
            max(r["decode_s"] for r in stats["runs"]) - min(r["decode_s"] for r in stats["runs"]))


def test_flops_grow_with_order(base_and_ranges):
    base, ranges = base_and_ranges
    flops = [bench.flops_per_token(base)]
    for order in (2, 8, 16):
        flops.append(bench.flops_per_token(protected_copy(base, ranges, order)))
    assert all(b > a for a, b in zip(flops, flops[1:])), flops
    # the MLP part is linear in the number of terms: equal steps for equal order steps
    p4, p8, p12 = (bench.flops_per_token(protected_copy(base, ranges, n)) for n in (4, 8, 12))
    assert p8 - p4 == p12 - p8 > 0


def test_term_benchmark_and_memory_estimates(models):
    model = models["n8"]
    t = bench.layer_term_benchmark(model)
    assert t["terms"] == 9 and t["protected"] == 64 and t["hidden"] == 32
    for key in ("mlp_ms", "overhead_ms", "plain_matmul_ms"):
        assert t[key] > 0
    # per term = (TaylorMLP − its non-series parts) / terms, clamped at 0; and its ratio to the plain matmul
    assert t["per_term_ms"] == pytest.approx(max(t["mlp_ms"] - t["overhead_ms"], 0.0) / t["terms"])
    assert t["per_term_vs_matmul"] == pytest.approx(t["per_term_ms"] / t["plain_matmul_ms"])
    assert bench.layer_term_benchmark(models["original"]) is None
    assert bench.series_feature_bytes_per_token(model) == 9 * 64 * 4
    assert bench.weights_bytes(model) > 0


def test_bench_models_table_and_plot(models, base_and_ranges, tmp_path):
    base, ranges = base_and_ranges
    all_models = {**models, "taylor4": protected_copy(base, ranges, 4, basis="taylor", preset="paper")}
    rows = bench.bench_models(all_models, PROMPT, tokens=2, repeats=2)
    by_name = {r["name"]: r for r in rows}
    assert by_name["original"]["decode_ratio"] == pytest.approx(1.0)
    assert by_name["original"]["flops_ratio"] == pytest.approx(1.0)
    assert by_name["n8"]["flops_ratio"] > by_name["taylor4"]["flops_ratio"] > 1.0
    # computed from the installed modules and the timings (not the spec the fixture wrote into the config)
    assert by_name["n8"]["term_benchmark"]["terms"] == 9 and by_name["taylor4"]["term_benchmark"]["terms"] == 5
    assert by_name["original"]["term_benchmark"] is None
    assert by_name["taylor4"]["series_feature_bytes_per_token"] == 5 * 64 * 4
    ref = by_name["original"]
    for row in rows:
        assert len(row["runs"]) == 2
        assert row["decode_ms_per_token"] == pytest.approx(row["decode_s_median"] / 2 * 1e3)
        paired = [run["decode_s"] / base["decode_s"] for run, base in zip(row["runs"], ref["runs"])]
        assert row["decode_ratio"] == pytest.approx(sum(paired) / 2)  # the median of the paired ratios
        prefill = [run["prefill_s"] / base["prefill_s"] for run, base in zip(row["runs"], ref["runs"])]
        assert row["prefill_ratio"] == pytest.approx(sum(prefill) / 2)
        assert (row["decode_ratio_min"], row["decode_ratio_max"]) == pytest.approx((min(paired), max(paired)))
    results = {"source": "tiny", "prompt_tokens": PROMPT.shape[1], "new_tokens": 2, "repeats": 2,
               "machine": {"threads": 1}, "models": rows}
    text = bench.format_table(results)
    assert "n8" in text and "taylor4" in text and "per term" in text
    png = bench.plot_results(results, tmp_path / "sub" / "bench.png")
    assert png.is_file() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_is_written_atomically(tmp_path, monkeypatch):
    """A plot that fails half way (a full disk) leaves the file that was there, and no temporary file."""
    from matplotlib.figure import Figure

    row = {"name": "r", "kind": "release", "order": 8, "basis": "taylor", "preset": "paper", "decode_ratio": 1.7,
           "validation_max_logit_error": None}
    results = {"source": "s", "new_tokens": 4, "models": [row]}
    path = tmp_path / "p.png"
    path.write_bytes(b"the previous plot")

    def half_written(self, fname, **kwargs):
        with open(fname, "wb") as fh:
            fh.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Figure, "savefig", half_written)
    with pytest.raises(TaylorMLPError, match="nothing was written there"):
        bench.plot_results(results, path)
    assert path.read_bytes() == b"the previous plot" and sorted(tmp_path.iterdir()) == [path]
    monkeypatch.undo()
    bench.plot_results(results, tmp_path / "noext")  # no suffix: matplotlib's default format, still renamed
    assert (tmp_path / "noext").read_bytes()[:4] == b"\x89PNG" and len(list(tmp_path.iterdir())) == 2


def test_plot_without_validation(tmp_path):
    row = {"name": "r", "kind": "release", "order": 8, "basis": "taylor", "preset": "paper", "decode_ratio": 1.7,
           "validation_max_logit_error": None}
    png = bench.plot_results({"source": "s", "new_tokens": 4, "models": [row]}, tmp_path / "p.png")
    assert png.stat().st_size > 1000


def test_unique_names():
    from pathlib import Path

    assert bench.unique_names([Path("a/x"), Path("b/y")]) == ["x", "y"]
    assert bench.unique_names([Path("a/x"), Path("b/x")]) == ["a/x", "b/x"]
    assert bench.unique_names([Path("a/original")]) == ["a/original"]


def test_memory_probe_in_fresh_process(base_and_ranges, tmp_path):
    from taylormlp.protection.flow import protect
    from taylormlp.release.directory import save_release

    base, ranges = base_and_ranges
    model = copy.deepcopy(base)
    protect(model, calibration=ranges, options=ProtectOptions(order=4, coverage=1.0))
    save_release(model, tmp_path / "rel")
    mem = bench.memory_probe("release", tmp_path / "rel", PROMPT, 2, timeout=120)
    assert "error" not in mem, mem
    assert mem["rss_peak_bytes"] >= mem["rss_after_load_bytes"] >= 0 and mem["baseline_rss_bytes"] > 0
    assert bench.memory_probe("release", tmp_path / "missing", PROMPT, 2, timeout=120)["error"]


def test_measure_decode_every_architecture(tiny_model):
    name, model = tiny_model
    res = bench.measure_decode(model, PROMPT, 3)
    out = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=4, do_sample=False,
                         pad_token_id=0)
    assert res["tokens"] == out[0, PROMPT.shape[1]:PROMPT.shape[1] + 3].tolist(), name
    assert bench.flops_per_token(model) > 0


def test_run_bench_end_to_end(tiny_llama_dir, tiny_release, tmp_path, capsys):
    import json

    results = bench.run_bench(tiny_llama_dir, [tiny_release], tokens=2, repeats=1, json_path=tmp_path / "b.json",
                              plot_path=tmp_path / "b.png", memory=False)
    names = [r["name"] for r in results["models"]]
    assert names == ["original", tiny_release.name]
    rel = results["models"][1]
    assert rel["order"] == 12 and rel["basis"] == "chebyshev" and rel["size_bytes"] > 0
    assert rel["validation_max_logit_error"] is not None and rel["flops_ratio"] > 1.0
    assert results["chat_template"] and results["prompt_tokens"] > 10
    assert json.loads((tmp_path / "b.json").read_text())["models"][1]["name"] == tiny_release.name
    assert (tmp_path / "b.png").stat().st_size > 1000
    assert "slowdown" in capsys.readouterr().out


def test_run_bench_batch_sizes_end_to_end(tiny_llama_dir, tiny_release, tmp_path, capsys):
    """--batch-sizes: one row per batch size and model, with consistent fields; batch 1 always among them and the
    latency table's run; the plot is slowdown against batch size."""
    import json

    results = bench.run_bench(tiny_llama_dir, [tiny_release], tokens=2, repeats=2, json_path=tmp_path / "b.json",
                              plot_path=tmp_path / "b.png", memory=False, batch_sizes=[4, 2])
    assert results["batch_sizes"] == [1, 2, 4]
    rows = results["throughput"]
    assert [(r["batch"], r["name"]) for r in rows] == [(b, n) for b in (1, 2, 4) for n in ("original", tiny_release.name)]
    by = {(r["batch"], r["kind"]): r for r in rows}
    for r in rows:
        runs = r["runs"]
        assert len(runs) == 2 and all(run["batch"] == r["batch"] and run["new_tokens"] == 2 for run in runs)
        decode = sorted(run["decode_s"] for run in runs)
        assert r["decode_s_median"] == pytest.approx(sum(decode) / 2)  # the median of two
        assert r["inter_token_ms"] == pytest.approx(r["decode_s_median"] / 2 * 1e3)
        assert r["decode_tokens_per_s"] == pytest.approx(r["batch"] * 2 / r["decode_s_median"])
        assert r["ttft_ms"] == pytest.approx(sum(run["prefill_s"] for run in runs) / 2 * 1e3)
        ref = by[(r["batch"], "original")]
        paired = [a["decode_s"] / b["decode_s"] for a, b in zip(runs, ref["runs"])]
        assert r["slowdown"] == pytest.approx(sum(paired) / 2)  # the median of the paired ratios
        assert (r["slowdown_min"], r["slowdown_max"]) == pytest.approx((min(paired), max(paired)))
    # the latency table is the batch-1 run itself, not a second timing
    assert results["models"][1]["runs"] == by[(1, "release")]["runs"]
    assert results["models"][1]["bytes_ratio"] > 1.0 and results["models"][0]["bytes_ratio"] == 1.0
    saved = json.loads((tmp_path / "b.json").read_text())
    assert [r["batch"] for r in saved["throughput"]] == [r["batch"] for r in rows]
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "throughput at batch sizes 1, 2, 4" in out and "inter-token ms" in out


def test_throughput_rows_from_injected_timings():
    """Every slowdown is the median of the paired (same-round) ratios, per phase; tokens/s is at the median decode
    time: decode times given."""
    from taylormlp.measure.throughput import throughput_rows

    def run(batch, decode_s, prefill_s=0.5):
        return {"batch": batch, "decode_s": decode_s, "prefill_s": prefill_s, "new_tokens": 4,
                "decode_tokens_per_s": batch * 4 / decode_s, "inter_token_s": decode_s / 4,
                "prefill_tokens_per_s": 1.0}
    timings = {8: {"original": [run(8, 1.0), run(8, 2.0), run(8, 3.0)],
                   "rel": [run(8, 6.0, 1.5), run(8, 10.0, 2.5), run(8, 21.0, 3.5)]},
               1: {"original": [run(1, 0.5)], "rel": [run(1, 1.0)]}}
    rows = throughput_rows(timings, "original", 4)
    assert [(r["batch"], r["name"], r["kind"]) for r in rows] == [(1, "original", "original"), (1, "rel", "release"),
                                                                  (8, "original", "original"), (8, "rel", "release")]
    rel8 = rows[3]
    assert rel8["slowdown"] == pytest.approx(6.0)  # paired: 6, 5, 7 (not the ratio of the medians, 10 / 2)
    assert (rel8["slowdown_min"], rel8["slowdown_max"]) == pytest.approx((5.0, 7.0))
    assert rel8["decode_slowdown"] == rel8["slowdown"] and rel8["prefill_slowdown"] == pytest.approx(5.0)  # 3, 5, 7
    assert rel8["request_slowdown"] == pytest.approx(7.5 / 1.5)  # paired (prefill + decode): 7.5/1.5, 12.5/2.5, 24.5/3.5
    assert rel8["decode_tokens_per_s"] == pytest.approx(8 * 4 / 10.0)  # tokens over the whole batch
    assert rows[2]["decode_tokens_per_s"] / rel8["decode_tokens_per_s"] == pytest.approx(5.0)
    assert rel8["ttft_ms"] == pytest.approx(2500.0) and rel8["inter_token_ms"] == pytest.approx(2500.0)
    assert rows[1]["slowdown"] == pytest.approx(2.0) and rows[0]["slowdown"] == rows[2]["slowdown"] == 1.0


def test_bench_refuses_releases_that_do_not_fit_in_memory_together(tiny_llama_dir, tiny_release, monkeypatch):
    """bench keeps every release in memory at once: too many bytes for this machine is a clear error before any
    loading, naming the sizes and the way out (fewer releases per run)."""
    import taylormlp.common.machine as machine

    size = sum(f.stat().st_size for f in tiny_release.glob("*.safetensors"))
    monkeypatch.setattr(machine, "available_memory", lambda: int(1.5 * size))
    bench.check_bench_memory([tiny_release])  # one fits
    with pytest.raises(TaylorMLPError, match=r"2 releases hold .* GB .* Bench fewer releases per run"):
        bench.run_bench(tiny_llama_dir, [tiny_release, tiny_release], tokens=1, repeats=1, memory=False)
    monkeypatch.setattr(machine, "available_memory", lambda: None)  # unknown: no check
    bench.check_bench_memory([tiny_release] * 3)
