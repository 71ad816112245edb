"""The release directory: round trip, stock loading, integrity checks, atomic writes."""

import json
import shutil

import pytest
import torch

from taylormlp import load_release, runtime
from taylormlp.common.errors import TaylorMLPError
from taylormlp.release.leakcheck import leak_check
from taylormlp.protection.flow import protect_to_release
from taylormlp.measure.generate import generate_ids
from taylormlp.release.directory import MANIFEST, release_dtype, verify_release
from taylormlp.release.sources import load_base

from conftest import FAST


def _copy(release, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(release, dst)
    return dst


def test_round_trip_keeps_module_tree_and_generation(tiny_release, tiny_llama_dir, smol_tokenizer):
    model = load_release(tiny_release)
    spec = model.config.taylormlp
    assert all(isinstance(layer.mlp, runtime.TaylorMLP) for layer in model.model.layers)
    assert 0.0 < spec["coverage"] <= 1.0
    assert sum(layer.mlp.protected for layer in model.model.layers) == sum(r["protected"] for r in spec["layers"])
    original, _, _ = load_base(tiny_llama_dir)
    a, _ = generate_ids(original, smol_tokenizer, "The history of bread", False, 16)
    b, _ = generate_ids(model, smol_tokenizer, "The history of bread", False, 16)
    assert torch.equal(a, b)


def test_stock_transformers_loads_with_remote_code(tiny_release, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(tiny_release, trust_remote_code=True)
    ours = load_release(tiny_release)
    assert type(stock.model.layers[0].mlp).__name__ == "TaylorMLP"
    ids = smol_tokenizer("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, ours(ids).logits)


def test_modeling_file_is_the_runtime(tiny_release):
    """The release carries the runtime verbatim: runtime.py as modeling_taylormlp.py and the module it imports."""
    from taylormlp import series_module

    assert (tiny_release / "modeling_taylormlp.py").read_text() == open(runtime.__file__).read()
    assert (tiny_release / "series_module.py").read_text() == open(series_module.__file__).read()


def _shard_of(rel, key="model.layers.1.mlp.theta"):
    """The safetensors file of release `rel` that holds tensor `key` (releases are written one shard per layer)."""
    import json

    return rel / json.loads((rel / "model.safetensors.index.json").read_text())["weight_map"][key]


def test_release_is_sharded_per_layer(tiny_release):
    import json

    weight_map = json.loads((tiny_release / "model.safetensors.index.json").read_text())["weight_map"]
    assert weight_map["model.layers.0.mlp.theta"] != weight_map["model.layers.1.mlp.theta"]
    assert weight_map["model.layers.1.self_attn.q_proj.weight"] == weight_map["model.layers.1.mlp.theta"]
    assert not any(k.endswith("down_proj.weight") for k in weight_map)


def test_tampered_file_is_named(tiny_release, tmp_path):
    rel = _copy(tiny_release, tmp_path)
    weights = _shard_of(rel)
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(TaylorMLPError, match=f"{weights.name} fails its sha256"):
        load_release(rel)


def test_truncated_file_is_named(tiny_release, tmp_path):
    rel = _copy(tiny_release, tmp_path)
    weights = _shard_of(rel)
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(TaylorMLPError, match=f"{weights.name} has .* bytes"):
        load_release(rel)


def test_missing_file_is_named(tiny_release, tmp_path):
    rel = _copy(tiny_release, tmp_path)
    (rel / "modeling_taylormlp.py").unlink()
    with pytest.raises(TaylorMLPError, match="modeling_taylormlp.py is missing"):
        load_release(rel)


def test_missing_manifest_means_incomplete(tiny_release, tmp_path):
    rel = _copy(tiny_release, tmp_path)
    (rel / MANIFEST).unlink()
    with pytest.raises(TaylorMLPError, match="not a complete taylormlp release"):
        load_release(rel)


@pytest.mark.parametrize("first_file", [None, "model-00001-of-00003.safetensors.partial", "tokenizer.json"])
def test_a_release_left_half_written_is_incomplete_whatever_it_holds(tmp_path, first_file):
    """A run killed while writing leaves its hidden temporary directory; whichever file it had begun, loading it says
    it is an incomplete release (not "not a release")."""
    tmp = tmp_path / ".rel.tmp-abc123"
    tmp.mkdir()
    if first_file:
        (tmp / first_file).write_bytes(b"\0" * 16)
    with pytest.raises(TaylorMLPError, match="not a complete taylormlp release"):
        load_release(tmp)


def test_unknown_format_version(tiny_release, tmp_path):
    rel = _copy(tiny_release, tmp_path)
    manifest = json.loads((rel / MANIFEST).read_text())
    manifest["format_version"] = 99
    (rel / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(TaylorMLPError, match="unknown format_version 99"):
        load_release(rel)


def test_existing_output_is_refused_unless_force(tiny_release, tiny_llama_dir):
    before = sorted(p.name for p in tiny_release.iterdir())
    with pytest.raises(TaylorMLPError, match="already exists.*--force"):
        protect_to_release(tiny_llama_dir, tiny_release, preset="paper", coverage=0.5, **FAST)
    assert sorted(p.name for p in tiny_release.iterdir()) == before
    verify_release(tiny_release)


def test_force_replaces_and_leaves_no_temporary(tiny_llama_dir, tmp_path):
    out = tmp_path / "rel"
    protect_to_release(tiny_llama_dir, out, preset="paper", coverage=0.25, **FAST)
    protect_to_release(tiny_llama_dir, out, preset="default", coverage=0.5, force=True, **FAST)
    assert verify_release(out)["taylormlp"]["preset"] == "default"
    assert [p.name for p in tmp_path.iterdir()] == ["rel"]


def test_failed_protect_leaves_nothing(tiny_llama_dir, tmp_path):
    out = tmp_path / "rel"
    with pytest.raises(TaylorMLPError, match="empty"):
        empty = tmp_path / "empty.txt"
        empty.write_text("\n\n  \n")
        protect_to_release(tiny_llama_dir, out, calibration_file=empty, **FAST)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["empty.txt"]


def test_leak_check_finds_nothing_in_release_and_catches_a_plant(tiny_release, tiny_llama_dir, tmp_path):
    report = leak_check(tiny_release, tiny_llama_dir)
    assert report["leaks"] == []
    assert report["tensors_scanned"] > 10
    # plant an original down column into a coefficient tensor: the scan must find it
    from safetensors.torch import load_file, save_file

    from taylormlp.release.directory import write_manifest

    rel = _copy(tiny_release, tmp_path)
    key = "model.layers.1.mlp.theta"
    shard = _shard_of(rel, key)
    tensors = load_file(shard)
    original, _, _ = load_base(tiny_llama_dir)
    tensors[key][:, 3] = original.model.layers[1].mlp.down_proj.weight[:, 7]
    save_file(tensors, shard, metadata={"format": "pt"})
    write_manifest(rel)
    assert any(key in leak for leak in leak_check(rel, tiny_llama_dir)["leaks"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_release_dtype(tiny_llama_dir, tmp_path, dtype):
    out = tmp_path / dtype
    protect_to_release(tiny_llama_dir, out, preset="default", coverage=0.5, dtype=dtype, **FAST)
    model = load_release(out)
    assert model.model.layers[0].mlp.theta.dtype == getattr(torch, dtype)
    assert release_dtype(out) == getattr(torch, dtype)  # what bench and the GPU prediction load the original in
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


def test_piecewise_release_round_trips(tiny_llama_dir, tmp_path, smol_tokenizer):
    """Pieces (owner, edges, per-piece Θ) survive save/load, also through stock transformers."""
    from transformers import AutoModelForCausalLM

    from taylormlp.protection.flow import protect_to_release

    out = tmp_path / "pieces"
    protect_to_release(tiny_llama_dir, out, preset="default", order=4, coverage=1.0, max_pieces=4,
                       piece_tolerance=1e-12, **FAST)
    model = load_release(out)
    mlps = [layer.mlp for layer in model.model.layers]
    assert any(m.pieces > m.protected for m in mlps)
    assert [m.pieces for m in mlps] == [r["pieces"] for r in model.config.taylormlp["layers"]]
    stock = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    ids = smol_tokenizer("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, model(ids).logits)
    original, _, _ = load_base(tiny_llama_dir)
    a, _ = generate_ids(original, smol_tokenizer, "The history of bread", False, 16)
    b, _ = generate_ids(model, smol_tokenizer, "The history of bread", False, 16)
    assert torch.equal(a, b)


def test_release_spec_round_trips_and_shapes_the_modules(tiny_release):
    """config.json's taylormlp section -> ReleaseSpec -> dict is the identity, and the shapes it gives are the
    loaded modules' own (protected channels, pieces, rest channels, order)."""
    config = json.loads((tiny_release / "config.json").read_text())
    spec = runtime.ReleaseSpec.from_dict(config["taylormlp"])
    assert spec.to_dict() == config["taylormlp"]
    assert "validation" in spec.record and "calibration" in spec.record  # what protect measured, kept as recorded
    model = load_release(tiny_release)
    for shape, layer in zip(spec.layers, model.model.layers):
        mlp = layer.mlp
        assert (mlp.protected, mlp.pieces, mlp.order) == (shape.protected, shape.pieces, spec.order)
        assert (mlp.rest.gate.out_features if mlp.rest is not None else 0) == shape.rest


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(format_version=3), r"unknown taylormlp format_version 3; this runtime reads versions 1 and 2"),
    (lambda s: s.pop("format_version"), r"unknown taylormlp format_version None"),
    (lambda s: s.pop("basis"), r"lacks basis"),
    (lambda s: s["layers"][0].pop("protected"), r"layers are malformed"),
])
def test_release_spec_refuses_other_formats_and_damage(tiny_release, change, message):
    spec = json.loads((tiny_release / "config.json").read_text())["taylormlp"]
    change(spec)
    with pytest.raises(ValueError, match=message):
        runtime.ReleaseSpec.from_dict(spec)


def test_release_spec_reads_layers_without_pieces_as_one_piece_per_channel():
    """Releases written before piecewise series had no 'pieces' per layer: one piece per protected channel."""
    spec = runtime.ReleaseSpec.from_dict({"format_version": runtime.FORMAT_VERSION, "family": "gated",
                                          "hidden_size": 8, "activation": "silu", "order": 3, "basis": "taylor",
                                          "coverage": 0.5, "layers": [{"protected": 2, "rest": 2}]})
    module = runtime.TaylorMLP(spec.family, spec.hidden_size, spec.layers[0].protected, spec.layers[0].rest,
                               spec.order, spec.basis, spec.activation, pieces=spec.layers[0].pieces)
    assert module.pieces == 2 and module.theta.shape == (8, 4 * 2)


def test_release_dtype_default_and_unknown(tmp_path):
    rel = tmp_path / "rel"
    rel.mkdir()
    (rel / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert release_dtype(rel) == torch.float32  # a config that names no dtype: float32, as transformers reads it
    (rel / "config.json").write_text(json.dumps({"dtype": "int8"}))
    with pytest.raises(TaylorMLPError, match="int8"):
        release_dtype(rel)
