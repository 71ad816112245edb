"""Releases larger than memory: load_release / stock transformers with accelerate's device_map and disk offload."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from taylormlp import load_release, runtime
from taylormlp.common.errors import TaylorMLPError
from taylormlp.release.directory import write_manifest

NEW_TOKENS = 12
PROMPT = "The history of bread"
# a tiny Llama's modules, the last decoder layer on disk and everything else offloaded to CPU memory
MIXED_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
             "model.rotary_emb": "cpu", "lm_head": "cpu"}


def weight_bytes(release) -> int:
    return sum(p.stat().st_size for p in release.glob("*.safetensors"))


def cpu_budget(release) -> dict:
    """max_memory well below the weights: accelerate has to put (some of) the release on disk."""
    return {"cpu": weight_bytes(release) // 2}


def greedy(model, tokenizer):
    enc = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return out[0, enc.input_ids.shape[1]:]


def relayout(src, dst, sharded: bool):
    """A copy of release `src` with its weights rewritten as one model.safetensors or as one shard per top-level
    group (embeddings, each decoder layer, the rest) with model.safetensors.index.json; manifest rewritten."""
    shutil.copytree(src, dst)
    tensors = {}
    for path in sorted(dst.glob("*.safetensors")):
        tensors.update(load_file(path))
        path.unlink()
    (dst / "model.safetensors.index.json").unlink(missing_ok=True)
    if not sharded:
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    else:
        groups = {}
        for name in sorted(tensors):
            parts = name.split(".")
            groups.setdefault(".".join(parts[:3]) if parts[1] == "layers" else parts[0], []).append(name)
        weight_map = {}
        for k, names in enumerate(groups.values()):
            shard = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file({n: tensors[n] for n in names}, dst / shard, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, shard))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (dst / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (dst / "taylormlp_manifest.json").unlink()
    write_manifest(dst)
    return dst


@pytest.fixture(scope="module")
def layouts(tiny_release, tmp_path_factory):
    """The tiny release as a single safetensors file and as a sharded checkpoint (as streamed releases are)."""
    base = tmp_path_factory.mktemp("layouts")
    return {"single": relayout(tiny_release, base / "single", sharded=False),
            "sharded": relayout(tiny_release, base / "sharded", sharded=True)}


@pytest.fixture(scope="module")
def reference(tiny_release, smol_tokenizer):
    """Greedy tokens of the fully loaded release (no device_map), float32 and bfloat16."""
    return {dtype: greedy(load_release(tiny_release, dtype=dtype), smol_tokenizer)
            for dtype in (torch.float32, torch.bfloat16)}


def assert_offloaded(model):
    device_map = getattr(model, "hf_device_map", None) or {}
    assert "disk" in set(device_map.values()), device_map
    tensors = [*model.named_parameters(), *model.named_buffers()]  # a piecewise layer's owner and edges are buffers
    on_meta = [name for name, p in tensors if p.device.type == "meta"]
    assert on_meta, "device_map put weights on disk, yet every parameter is materialised"
    return on_meta


def piecewise_layers(model):
    return [i for i, layer in enumerate(model.model.layers) if layer.mlp.pieces > layer.mlp.protected]


def test_default_load_is_unchanged(tiny_release):
    model = load_release(tiny_release)
    assert getattr(model, "hf_device_map", None) is None
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())
    assert not model.training


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_auto_device_map_offloads_to_disk_and_generates_the_same(layouts, layout, smol_tokenizer, reference, tmp_path):
    release = layouts[layout]
    assert (release / "model.safetensors.index.json").is_file() == (layout == "sharded")
    model = load_release(release, device_map="auto", max_memory=cpu_budget(release), offload_folder=tmp_path / "off")
    on_meta = assert_offloaded(model)
    assert piecewise_layers(model), "the default preset should give piecewise layers (owner, ±inf edges)"
    assert any(name.endswith("mlp.theta") for name in on_meta)
    # the piece index and edges are buffers: accelerate keeps them resident (a few values a layer), owner an int64 index
    assert all(m.owner.device.type == "cpu" and m.owner.dtype == torch.int64 for m in
               (model.model.layers[i].mlp for i in piecewise_layers(model)))
    assert not model.training
    assert torch.equal(greedy(model, smol_tokenizer), reference[torch.float32])


def test_auto_device_map_without_offload_folder_reads_the_release_in_place(tiny_release, smol_tokenizer, reference):
    """Releases are safetensors, so transformers offloads from the release's own files: no folder needed."""
    model = load_release(tiny_release, device_map="auto", max_memory=cpu_budget(tiny_release))
    assert_offloaded(model)
    assert torch.equal(greedy(model, smol_tokenizer), reference[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_explicit_disk_layer_keeps_int64_owner_and_infinite_edges(tiny_release, smol_tokenizer, reference, tmp_path,
                                                                   dtype):
    model = load_release(tiny_release, dtype=dtype, device_map=MIXED_MAP, offload_folder=tmp_path)
    assert_offloaded(model)
    assert model.hf_device_map["model.layers.1"] == "disk"
    mlp = model.model.layers[1].mlp
    assert 1 in piecewise_layers(model)
    assert mlp.theta.device.type == "meta" and mlp.owner.device.type == "cpu"  # buffers stay resident
    # what the module runs with at each forward: Θ from accelerate's weights map, the resident index and edges
    weights = mlp._hf_hook.weights_map
    owner, lo, hi = mlp.owner, mlp.edge_lo, mlp.edge_hi
    assert owner.dtype == torch.int64 and int(owner.min()) >= 0 and int(owner.max()) < mlp.protected
    assert lo.dtype == hi.dtype == weights["theta"].dtype == dtype
    assert torch.isneginf(lo).any() and torch.isposinf(hi).any()
    assert torch.equal(greedy(model, smol_tokenizer), reference[dtype])


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_stock_transformers_offloads_a_release(layouts, layout, smol_tokenizer, reference, tmp_path):
    from transformers import AutoModelForCausalLM

    release = layouts[layout]
    auto = AutoModelForCausalLM.from_pretrained(release, trust_remote_code=True, device_map="auto",
                                                max_memory=cpu_budget(release), offload_folder=tmp_path / "a")
    assert type(auto.model.layers[0].mlp).__name__ == "TaylorMLP"
    assert_offloaded(auto)
    assert torch.equal(greedy(auto, smol_tokenizer), reference[torch.float32])

    mixed = AutoModelForCausalLM.from_pretrained(release, trust_remote_code=True, device_map=MIXED_MAP,
                                                 offload_folder=tmp_path / "b")
    assert_offloaded(mixed)
    assert mixed.model.layers[1].mlp.theta.device.type == "meta" and mixed.model.layers[1].mlp.owner.dtype == torch.int64
    assert torch.equal(greedy(mixed, smol_tokenizer), reference[torch.float32])


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_memory={"cpu": "1GB"}), "max_memory takes effect only with a device_map"),
    (dict(offload_folder="somewhere"), "offload_folder takes effect only with a device_map"),
    (dict(device_map="autoo"), "device_map must be one of auto, balanced.*got 'autoo'"),
    (dict(device_map="disk"), "device_map='disk' is not a placement"),
    (dict(device_map={}), "device_map is an empty dict"),
    (dict(device_map={"model": "gpu7"}), r"device_map\['model'\]: 'gpu7' is not a device"),
    (dict(device_map=1.5), "device_map: 1.5 is not a device"),
    (dict(device_map="auto", max_memory="1GB"), "max_memory must be a non-empty dict"),
    (dict(device_map="auto", max_memory={"cpu": "lots"}), r"max_memory\['cpu'\] = 'lots' is not a size"),
    (dict(device_map="auto", max_memory={"cpu": -5}), r"max_memory\['cpu'\] = -5 is negative"),
    (dict(device_map="auto", max_memory={"ram": "1GB"}), "max_memory key 'ram' is not a device"),
    (dict(device_map=f"cuda:{torch.cuda.device_count()}"), "names a device this machine does not have"),
    (dict(device_map={"": 99}), r"device_map\[''\]: 99 names a device this machine does not have"),
    (dict(device_map="auto", max_memory={99: "1GB", "cpu": "1GB"}), "max_memory: 99 names a device"),
    (dict(device_map={"model.layers.0": "disk"}), "cannot place .* does not give any device for .*lm_head.weight"),
])
def test_bad_placement_arguments_are_named(tiny_release, kwargs, message):
    with pytest.raises(TaylorMLPError, match=message):
        load_release(tiny_release, **kwargs)


def test_offload_folder_must_not_be_inside_the_release(tiny_release, tmp_path):
    with pytest.raises(TaylorMLPError, match="lies inside the release"):
        load_release(tiny_release, device_map="auto", offload_folder=tiny_release / "offload")
    assert not (tiny_release / "offload").exists()
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(TaylorMLPError, match="exists and is not a directory"):
        load_release(tiny_release, device_map="auto", offload_folder=afile)


def test_offload_that_needs_a_folder_says_so(tiny_release, monkeypatch):
    """Should transformers have to re-save offloaded weights (it does for non-safetensors or converted weights),
    its ValueError becomes a TaylorMLPError that asks for offload_folder."""
    from transformers import AutoConfig

    cls = runtime.release_class(AutoConfig.from_pretrained(tiny_release))

    def refuse(*args, **kwargs):
        raise ValueError("The current `device_map` had weights offloaded to the disk, which needed to be re-saved. "
                         "Please provide an `offload_folder` for them in `from_pretrained`.")

    monkeypatch.setattr(cls, "from_pretrained", refuse)
    with pytest.raises(TaylorMLPError, match="pass offload_folder=DIR"):
        load_release(tiny_release, device_map="auto", max_memory=cpu_budget(tiny_release))
    with pytest.raises(TaylorMLPError, match="cannot place .* with device_map='auto'"):
        load_release(tiny_release, device_map="auto", offload_folder="elsewhere")
