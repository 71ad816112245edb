"""Slow tests on the real SmolLM2-135M-Instruct (installed by `make setup`): a few minutes on 2 cores."""

import json
from pathlib import Path

import pytest
import torch

from taylormlp import load_release
from taylormlp.measure.compare import compare, read_prompts
from taylormlp.release.leakcheck import leak_check
from taylormlp.protection.flow import protect_to_release
from taylormlp.release.inspect import inspect_release

pytestmark = pytest.mark.slow
PROMPTS = Path(__file__).resolve().parents[1] / "benchmarks" / "prompts_smollm2.json"


@pytest.fixture(scope="module")
def smol_paper_release(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "paper"
    protect_to_release("smollm2-135m-instruct", out, preset="paper")
    return out


def test_paper_release_is_token_exact_on_held_out_prompts(smol_paper_release):
    prompts = read_prompts(PROMPTS)
    subset = prompts[:3] + prompts[10:13]  # three chat, three raw
    result = compare("smollm2-135m-instruct", smol_paper_release, subset, max_new_tokens=32)
    assert result["identical"] >= 5, json.dumps(result["rows"], indent=1)


def test_paper_release_inspect_and_leak_check(smol_paper_release):
    info = inspect_release(smol_paper_release)
    assert info["architecture"] == "llama" and info["basis"] == "taylor" and info["order"] == 8
    assert info["coverage"] > 0.05
    assert info["validation"]["exact"]
    report = leak_check(smol_paper_release, "smollm2-135m-instruct")
    assert report["leaks"] == []
    assert any("theta" in t["name"] for t in report["tensors"])


def test_paper_release_keeps_module_tree_and_batching(smol_paper_release):
    from transformers import AutoTokenizer

    model = load_release(smol_paper_release)
    tok = AutoTokenizer.from_pretrained(smol_paper_release)
    assert type(model.model.layers[0].mlp).__name__ == "TaylorMLP"
    tok.padding_side = "left"
    batch = tok(["The sun is", "Water is made of hydrogen and"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape == (2, batch.input_ids.shape[1] + 8)


def test_default_release_protects_nearly_everything_token_exactly(tmp_path):
    """Issue 4's default mode on the real model: coverage >= 0.9 chosen automatically, held-out prompts exact."""
    out = tmp_path / "default"
    protect_to_release("smollm2-135m-instruct", out)
    info = inspect_release(out)
    assert info["basis"] == "chebyshev" and info["order"] == 8
    assert info["coverage"] >= 0.9, info["coverage"]
    assert info["pieces_per_protected_channel"] > 1.0  # the default splits wide channels into pieces
    prompts = read_prompts(PROMPTS)
    subset = prompts[3:6] + prompts[13:16]  # three chat, three raw (not the ones the paper test uses)
    result = compare("smollm2-135m-instruct", out, subset, max_new_tokens=32)
    assert result["identical"] >= 5, json.dumps(result["rows"], indent=1)


def test_gguf_streamed_conversion_equals_transformers_whole_model_load(tmp_path):
    """gguf_convert dequantizes tensor by tensor; transformers' from_pretrained(gguf_file=...) loads the whole model.
    Same tensors, bit for bit, same config and tokenizer."""
    import json

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from taylormlp.release.gguf import convert_gguf
    from taylormlp.release.sources import BUILTIN_MODELS

    gguf = BUILTIN_MODELS["smollm2-135m-instruct"].gguf_path()
    convert_gguf(gguf, tmp_path, shard_bytes=128 * 1024 ** 2)  # ~540 MB of float32: several shards and an index
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((tmp_path / name).is_file() for name in shards)
    ours = {}
    for name in shards:
        ours.update(load_file(tmp_path / name))
    assert set(ours) == set(index["weight_map"])
    whole = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    theirs = whole.state_dict()
    tied = {"lm_head.weight"} if whole.config.tie_word_embeddings else set()
    assert set(ours) == set(theirs) - tied
    for name, value in ours.items():
        assert torch.equal(value, theirs[name]), name
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)  # the directory loads as it is
    assert torch.equal(reloaded.lm_head.weight, whole.lm_head.weight)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [type(whole).__name__]
    assert config["num_hidden_layers"] == whole.config.num_hidden_layers
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "generation_config.json").is_file()
