"""The benchmark scripts behind issue 19's figures: benchmarks/scale.py's random models and
benchmarks/offload_generate.py's offloaded generation (tiny models here; the full-depth runs are not in the suite)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY_SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=49152, full_layers=2, tie_word_embeddings=True)


def script(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stds(directory: Path) -> dict:
    out = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                out[name] = float(f.get_tensor(name).float().std())
    return out


def test_random_model_is_one_shard_per_layer_with_the_gate_std_asked(tmp_path, smol_tokenizer):
    scale = script("scale")
    smol_tokenizer.save_pretrained(tmp_path / "tok")
    size = scale.make_model(tmp_path / "m", TINY_SHAPE, 2, tokenizer=tmp_path / "tok", gate_std=0.003)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())["weight_map"]
    assert {index[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(2)} == {
        index[f"model.layers.{i}.self_attn.q_proj.weight"] for i in range(2)}  # a layer's tensors share its shard
    assert len(set(index.values())) == 2 + 2  # embedding, final norm, one shard per layer (head tied)
    assert size == sum(f.stat().st_size for f in (tmp_path / "m").glob("*.safetensors"))
    got = stds(tmp_path / "m")
    for i in range(2):
        assert got[f"model.layers.{i}.mlp.gate_proj.weight"] == pytest.approx(0.003, rel=0.05)
        assert got[f"model.layers.{i}.mlp.up_proj.weight"] == pytest.approx(0.02, rel=0.05)
        assert got[f"model.layers.{i}.input_layernorm.weight"] == 0.0  # norms are ones
    default = scale.make_model(tmp_path / "d", TINY_SHAPE, 1, tokenizer=tmp_path / "tok")
    assert default == scale.make_model(tmp_path / "d2", TINY_SHAPE, 1, tokenizer=tmp_path / "tok")
    assert stds(tmp_path / "d")["model.layers.0.mlp.gate_proj.weight"] == pytest.approx(0.02, rel=0.05)


def test_max_memory_pairs_parse_and_refuse():
    offload = script("offload_generate")
    assert offload.parse_memory(["cpu=4GiB", "0=8GiB"]) == {"cpu": "4GiB", 0: "8GiB"}
    with pytest.raises(SystemExit, match="DEVICE=SIZE"):
        offload.parse_memory(["4GiB"])


def test_offloaded_release_generates_the_originals_tokens(tmp_path, tiny_llama_dir, tiny_release):
    """Both models with max_memory far below their weights (most of each on disk), float32: the release's greedy
    tokens and its teacher-forced argmaxes are the original's, and the report says where the modules went."""
    offload = script("offload_generate")
    out = tmp_path / "report.json"
    assert offload.main([str(tiny_llama_dir), str(tiny_release), "--max-memory", "cpu=200KB", "--tokens", "6",
                         "--dtype", "float32", "--offload-folder", str(tmp_path / "off"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["identical_tokens"] == 6
    assert report["release_run"]["teacher_forced"]["tokens_matched"] == report["release_run"]["teacher_forced"][
        "tokens"] == 6
    assert report["original"]["tokens"] == report["release_run"]["tokens"]
    for run in (report["original"], report["release_run"]):
        assert run["placement"].get("disk", 0) > 0, run["placement"]
        assert run["s_per_token"] > 0 and run["peak_rss_bytes"] > 0


def test_every_bench_result_s_slowdowns_are_the_median_of_paired_ratios(capsys):
    """results/ bench files keep their rounds: recomputing their slowdowns with the one statistic changes nothing
    (benchmarks/restat.py --check), so no figure there is a ratio of medians."""
    assert script("restat").main(["--check"]) == 0, capsys.readouterr().out


def test_restat_recomputes_a_ratio_of_medians_as_the_median_of_paired_ratios(tmp_path):
    """Three rounds where the ratio of medians (3/1 = 3.0) and the median of the paired ratios (2.0) differ."""
    restat = script("restat")
    runs = {"original": [1.0, 2.0, 1.0], "release": [2.0, 3.0, 4.0]}  # paired 2.0, 1.5, 4.0: median 2.0
    models = [{"name": n, "kind": "original" if n == "original" else "release",
               "runs": [{"prefill_s": t, "decode_s": t} for t in times],
               "decode_ratio": 3.0 if n != "original" else 1.0,
               "decode_ratio_min": 1.5, "decode_ratio_max": 4.0, "prefill_ratio": 3.0} for n, times in runs.items()]
    results = {"models": models}
    changes = restat.restat(results)
    release = results["models"][1]
    assert release["decode_ratio"] == 2.0 and release["prefill_ratio"] == 2.0  # was 3.0: median 3 / median 1
    assert (release["decode_ratio_min"], release["decode_ratio_max"]) == (1.5, 4.0)
    assert any("decode_ratio: 3.0 -> 2.0" in line for line in changes) and results["statistic"]
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps({"models": [{**m, "decode_ratio": 3.0} if m["kind"] == "release" else m
                                            for m in results["models"]]}))
    assert restat.main([str(stale), "--check"]) == 1  # a ratio of medians is found
    assert restat.main([str(stale)]) == 0 and json.loads(stale.read_text())["models"][1]["decode_ratio"] == 2.0
