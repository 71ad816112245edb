"""Which loaders load a release (format 2) and which refuse it.

Right: taylormlp.load_release, AutoModelForCausalLM / AutoModel with trust_remote_code (the release's own classes).
Wrong, and refused with a one-line error that says how to load: stock classes of the base architecture
(AutoModelForCausalLM without trust_remote_code, LlamaForCausalLM.from_pretrained, `transformers serve`'s
getattr(transformers, config.architectures[0])), which used to return a Llama with random MLPs.
"""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from taylormlp import load_release, runtime
from taylormlp.attacks.context import RecoveredLayer, rebuild_model
from taylormlp.common.errors import TaylorMLPError
from taylormlp.protection.flow import protect_to_release
from taylormlp.release.directory import MANIFEST, write_manifest

from conftest import FAST, TINY_ARCHS, tiny

PROMPT = "Once upon a time"
HOW = ("taylormlp.load_release(DIR)", "AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)")


@pytest.fixture(scope="module")
def ids(smol_tokenizer):
    return smol_tokenizer(PROMPT, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def reference(tiny_release, ids):
    """load_release's logits and greedy tokens: what every right loader must give."""
    model = load_release(tiny_release)
    with torch.no_grad():
        return model(ids).logits, greedy(model, ids)


def greedy(model, ids):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=0)
    return out[0, ids.shape[1]:]


def assert_says_how_to_load(exc):
    first = str(exc).splitlines()[0]
    assert all(how in first for how in HOW), first
    assert "TaylorMLP release" in first, first


# ---------------------------------------------------------------- what a release's config.json holds


def test_config_masks_the_activation_and_maps_both_auto_classes(tiny_release):
    config = json.loads((tiny_release / "config.json").read_text())
    assert config["hidden_act"] == runtime.LOAD_NOTICE and "\n" not in runtime.LOAD_NOTICE
    assert config["taylormlp"]["format_version"] == runtime.FORMAT_VERSION == 2
    assert config["taylormlp"]["masked"] == {"hidden_act": "silu"}
    # vLLM takes the first name it knows: taylormlp's plugin's class, else its stock Llama (which stops on the notice)
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["TaylorMLPLlamaForCausalLM", "LlamaForCausalLM"]
    assert config["auto_map"] == {"AutoModel": "modeling_taylormlp.TaylorMLPLlamaModel",
                                  "AutoModelForCausalLM": "modeling_taylormlp.TaylorMLPLlamaForCausalLM"}
    assert json.loads((tiny_release / MANIFEST).read_text())["format_version"] == 2


def test_loaded_release_has_its_real_activation(tiny_release):
    model = load_release(tiny_release)
    assert model.config.hidden_act == "silu"
    assert all(isinstance(layer.mlp, runtime.TaylorMLP) for layer in model.model.layers)


# ---------------------------------------------------------------- wrong loaders refuse


def _serve_replica(d):
    """What `transformers serve` does (cli/serving/model_manager.py): config by AutoConfig, class by name."""
    config = AutoConfig.from_pretrained(d, trust_remote_code=True)
    return getattr(transformers, config.architectures[0]).from_pretrained(d, trust_remote_code=True)


def _serve(d):
    """`transformers serve`'s own loader: its ModelLoader from 5.25, its ModelManager before (which loads the name
    that its process_model_name makes: "DIR@main" in 5.19)."""
    from transformers.cli.serving import model_manager

    if hasattr(model_manager, "ModelLoader"):
        return model_manager.ModelLoader(device="cpu", trust_remote_code=True)._load_model(str(d))
    manager = model_manager.ModelManager(device="cpu", trust_remote_code=True)
    return manager._load_model(manager.process_model_name(str(d)))


WRONG = {
    "AutoModelForCausalLM-without-trust_remote_code": lambda d: AutoModelForCausalLM.from_pretrained(d),
    "AutoModel-without-trust_remote_code": lambda d: AutoModel.from_pretrained(d),
    "LlamaForCausalLM": lambda d: transformers.LlamaForCausalLM.from_pretrained(d),
    "LlamaForCausalLM-with-trust_remote_code": lambda d: transformers.LlamaForCausalLM.from_pretrained(
        d, trust_remote_code=True),
}


@pytest.mark.parametrize("loader", list(WRONG), ids=list(WRONG))
def test_wrong_loader_refuses_and_says_how_to_load(tiny_release, loader):
    with pytest.raises(Exception) as info:
        WRONG[loader](tiny_release)
    assert_says_how_to_load(info.value)


@pytest.mark.parametrize("loader", [_serve_replica, _serve], ids=["serve-getattr-architectures", "serve-ModelManager"])
def test_transformers_serve_refuses_naming_the_release_class(tiny_release, loader):
    """`transformers serve` builds getattr(transformers, architectures[0]): a release names taylormlp's own class
    first (for vLLM's plugin), which transformers lacks, so it stops there, before building any MLP."""
    with pytest.raises(AttributeError, match="TaylorMLPLlamaForCausalLM"):
        loader(tiny_release)


def test_protect_refuses_a_release_as_its_source(tiny_release, tmp_path):
    """A release is no model to protect (its stock classes cannot build it, and it holds no down projections)."""
    with pytest.raises(TaylorMLPError, match=r"is a taylormlp release, not an original model; SOURCE takes the "
                                             r"original \(unprotected\) model"):
        protect_to_release(tiny_release, tmp_path / "again", preset="default", **FAST)
    assert not (tmp_path / "again").exists()


# ---------------------------------------------------------------- right loaders agree with load_release


@pytest.mark.parametrize("kwargs", [{}, {"device_map": "auto", "max_memory": {"cpu": "2GB"}}], ids=["plain", "auto"])
def test_remote_code_loader_gives_load_release_logits_and_tokens(tiny_release, ids, reference, kwargs):
    model = AutoModelForCausalLM.from_pretrained(tiny_release, trust_remote_code=True, **kwargs).eval()
    assert type(model).__name__ == "TaylorMLPLlamaForCausalLM"
    assert type(model).__module__.endswith("modeling_taylormlp")  # the release's own copy of the runtime
    assert model.config.hidden_act == "silu"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference[0])
    assert torch.equal(greedy(model, ids), reference[1])


def test_automodel_builds_the_base_model_with_its_taylor_mlps(tiny_release, ids):
    """vLLM's Transformers backend builds auto_map.AutoModel: the TaylorMLPs must be in the base model."""
    base = AutoModel.from_pretrained(tiny_release, trust_remote_code=True).eval()
    assert type(base).__name__ == "TaylorMLPLlamaModel" and isinstance(base, transformers.LlamaModel)
    assert [type(layer.mlp).__name__ for layer in base.layers] == ["TaylorMLP"] * len(base.layers)
    assert base._supports_attention_backend is True
    ours = load_release(tiny_release)
    with torch.no_grad():
        hidden = base(ids).last_hidden_state
        assert torch.equal(hidden, ours.model(ids).last_hidden_state)
        assert torch.equal(ours.lm_head(hidden), ours(ids).logits)
    # the weights are the release's, not fresh ones
    assert torch.equal(base.layers[1].mlp.theta, ours.model.layers[1].mlp.theta)


def test_audit_rebuild_of_a_loaded_release_is_a_stock_model(tiny_release, ids):
    """attacks.rebuild_model drops taylormlp/auto_map from the loaded config: the real activation must be there."""
    release = load_release(tiny_release)
    recovered = {}
    for i, layer in enumerate(release.model.layers):
        mlp = layer.mlp
        p = mlp.protected
        recovered[i] = RecoveredLayer(V=mlp.gate.weight.detach().double(), b=None, U=mlp.up.weight.detach().double(),
                                      W=torch.zeros(mlp.hidden, p, dtype=torch.float64), c=None)
    stock = rebuild_model(release, recovered)
    assert type(stock) is transformers.LlamaForCausalLM and stock.config.hidden_act == "silu"
    assert not hasattr(stock.config, "taylormlp") and not hasattr(stock.config, "auto_map")
    with torch.no_grad():
        assert torch.isfinite(stock(ids).logits).all()


# ---------------------------------------------------------------- format 1 releases still load


def _as_format_1(src, dst):
    """A copy of release `src` rewritten as taylormlp wrote releases before format 2 (activation in the clear, no
    'masked', auto_map for AutoModelForCausalLM only, format_version 1 in the spec and the manifest)."""
    shutil.copytree(src, dst)
    path = dst / "config.json"
    config = json.loads(path.read_text())
    spec = config["taylormlp"]
    config.update(spec.pop("masked"))
    spec["format_version"] = 1
    config["auto_map"] = {"AutoModelForCausalLM": config["auto_map"]["AutoModelForCausalLM"]}
    path.write_text(json.dumps(config, indent=2))
    (dst / MANIFEST).unlink()
    write_manifest(dst)
    manifest = json.loads((dst / MANIFEST).read_text())
    (dst / MANIFEST).write_text(json.dumps({**manifest, "format_version": 1}))
    return dst


def test_format_1_release_still_loads(tiny_release, tmp_path, ids, reference):
    old = _as_format_1(tiny_release, tmp_path / "old")
    assert json.loads((old / "config.json").read_text())["hidden_act"] == "silu"
    model = load_release(old)
    assert model.config.taylormlp["format_version"] == 1
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference[0])
    stock = AutoModelForCausalLM.from_pretrained(old, trust_remote_code=True)
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, reference[0])


def _as_one_file(src, dst):
    """A copy of release `src` as taylormlp wrote releases before runtime.py's split: one modeling_taylormlp.py, the
    module inlined where the runtime imports it, no series_module.py."""
    from taylormlp import series_module

    shutil.copytree(src, dst)
    module = Path(series_module.__file__).read_text()
    body = module[module.index("from __future__ import annotations") + len("from __future__ import annotations"):]
    modeling = (dst / "modeling_taylormlp.py").read_text()
    start = modeling.index("from .series_module import (")
    end = modeling.index("\n\n", start)  # the import statement ends at the blank line after it
    (dst / "modeling_taylormlp.py").write_text(modeling[:start] + body + modeling[end:])
    (dst / "series_module.py").unlink()
    (dst / MANIFEST).unlink()
    write_manifest(dst)
    return dst


def test_a_release_written_before_the_runtime_split_still_loads(tiny_release, tmp_path, ids, reference):
    old = _as_one_file(tiny_release, tmp_path / "one-file")
    assert "class TaylorMLP(" in (old / "modeling_taylormlp.py").read_text() and not (old / "series_module.py").exists()
    with torch.no_grad():
        assert torch.equal(load_release(old)(ids).logits, reference[0])
        stock = AutoModelForCausalLM.from_pretrained(old, trust_remote_code=True)
        assert type(stock.model.layers[0].mlp).__module__.endswith("modeling_taylormlp")  # its own inlined module
        assert torch.equal(stock(ids).logits, reference[0])


def test_the_remote_code_loader_runs_the_release_s_own_series_module(tiny_release):
    stock = AutoModelForCausalLM.from_pretrained(tiny_release, trust_remote_code=True)
    module = type(stock.model.layers[0].mlp).__module__
    assert module.endswith(".series_module") and not module.startswith("taylormlp.")  # the copy, not the package


# ---------------------------------------------------------------- every architecture


def _configs():
    out = {arch: tiny(arch, inter=8, layers=2).config for arch in TINY_ARCHS}
    small = dict(vocab_size=64, hidden_size=16, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8)
    out["gemma"] = transformers.GemmaConfig(**small)
    out["gemma2"] = transformers.Gemma2Config(**small)
    return out


CONFIGS = _configs()


def test_every_architecture_is_covered():
    assert set(CONFIGS) == set(runtime.ARCHITECTURES)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_every_architecture_masks_restores_and_refuses_stock_classes(arch, tmp_path):
    config = copy.deepcopy(CONFIGS[arch])
    entry = runtime.ARCHITECTURES[arch]
    config.taylormlp = runtime.ReleaseSpec(
        family=entry["family"], hidden_size=config.hidden_size, activation=runtime.activation_name(config), order=3,
        basis="taylor", coverage=0.5, layers=[{"protected": 4, "rest": 4}] * 2).to_dict()
    written = runtime.masked_config(config)
    masked = written.taylormlp["masked"]
    assert masked and all(getattr(written, key) == runtime.LOAD_NOTICE for key in masked)
    assert all(getattr(config, key) == value != runtime.LOAD_NOTICE for key, value in masked.items())  # left as it was
    written.save_pretrained(tmp_path)
    on_disk = AutoConfig.from_pretrained(tmp_path)
    for stock_name in (entry["model_class"], entry["base_class"]):
        with pytest.raises(Exception) as info:
            getattr(transformers, stock_name)(AutoConfig.from_pretrained(tmp_path))
        assert_says_how_to_load(info.value)
    lm = runtime.release_class(on_disk)(AutoConfig.from_pretrained(tmp_path))
    base = runtime.release_class(on_disk, base=True)(AutoConfig.from_pretrained(tmp_path))
    assert isinstance(lm, getattr(transformers, entry["model_class"]))
    assert isinstance(base, getattr(transformers, entry["base_class"]))
    assert type(base).__name__ == "TaylorMLP" + entry["base_class"]
    for model, is_base in ((lm, False), (base, True)):
        assert [type(layer.mlp) for layer in runtime.decoder_layers(model, is_base)] == [runtime.TaylorMLP] * 2
        for key, value in masked.items():
            assert getattr(model.config, key) == value
    assert base._supports_attention_backend is True
    assert type(getattr(lm, lm.base_model_prefix)) is getattr(transformers, entry["base_class"])
