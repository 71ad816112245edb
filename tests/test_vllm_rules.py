"""Releases against vLLM's rules for a custom model on its Transformers modeling backend (vLLM docs, "Supported
models" > "Custom models" / "Writing custom models"), checked here without vLLM or a GPU:

* config.json holds auto_map.AutoModel, and the customisation is in the base model (test_loaders.py:
  test_config_masks_the_activation_and_maps_both_auto_classes, test_automodel_builds_the_base_model_with_its_taylor_mlps);
* the AutoModel class is backend compatible (``_supports_attention_backend``, what vLLM's is_backend_compatible() asks);
* kwargs go from the base model down to the attention, which calls attention through ALL_ATTENTION_FUNCTIONS: vLLM
  registers its own attention function, sets the model's attention implementation to it and passes
  ``attention_instances`` to the base model's forward;
* every tensor of the release files is a tensor of that base model by name (vLLM loads the weights itself).

What stays untested (vLLM is not installed and needs a GPU) is listed in docs/serving.md.
"""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AttentionInterface, AutoModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

PROBE = "taylormlp_vllm_probe"


@pytest.fixture(scope="module")
def base(tiny_release):
    """The release's base model as vLLM's backend builds it: auto_map.AutoModel with trust_remote_code."""
    return AutoModel.from_pretrained(tiny_release, trust_remote_code=True).eval()


def test_automodel_class_is_backend_compatible(base):
    assert type(base).__name__ == "TaylorMLPLlamaModel"
    assert type(base).is_backend_compatible() is True


def test_attention_goes_through_the_registered_function_with_the_callers_kwargs(tiny_release, smol_tokenizer):
    calls = []

    def probe(module, query, key, value, attention_mask, attention_instances=None, **kwargs):
        calls.append((module.layer_idx, attention_instances))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(PROBE, probe)
    model = AutoModel.from_pretrained(tiny_release, trust_remote_code=True).eval()  # its own copy: config changes
    ids = smol_tokenizer("Once upon a time", return_tensors="pt").input_ids
    instances = {i: f"vllm attention {i}" for i in range(len(model.layers))}
    with torch.no_grad():
        reference = model(ids).last_hidden_state
        model.set_attn_implementation(PROBE)
        hidden = model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], use_cache=False,
                       attention_instances=instances, return_dict=False)[0]
    assert calls == [(i, instances) for i in range(len(model.layers))]  # every layer, the caller's object
    assert torch.equal(hidden, reference)  # the TaylorMLPs run on that path as on the default one


def test_every_release_tensor_is_a_base_model_tensor_by_name(tiny_release, base):
    index = json.loads((tiny_release / "model.safetensors.index.json").read_text())
    stored = {}
    for name in sorted(set(index["weight_map"].values())):
        with safe_open(str(tiny_release / name), "pt") as f:
            stored.update({key: f.get_tensor(key) for key in f.keys()})
    assert all(key.startswith("model.") for key in stored)  # no lm_head: tied to the embeddings
    state = base.state_dict()
    assert {key.removeprefix("model.") for key in stored} == set(state)  # nothing left at its random init
    assert any(".mlp.theta" in key for key in stored)
    for key, tensor in stored.items():
        assert state[key.removeprefix("model.")].dtype == tensor.dtype and torch.equal(
            state[key.removeprefix("model.")], tensor), key


# ---------------------------------------------------------------- what an engine does to the runtime (no vLLM needed)


def _piecewise_mlp(basis="chebyshev", order=12, seed=0):
    """A TaylorMLP with several pieces per channel and a rest MLP, random coefficients, inputs partly outside."""
    from taylormlp.runtime import TaylorMLP

    torch.manual_seed(seed)
    mlp = TaylorMLP("gated", 16, 6, 3, order, basis, "silu", pieces=10).eval()
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn_like(p))
        mlp.h.copy_(torch.rand(10) + 0.5)
        mlp.owner.copy_(torch.tensor([0, 0, 1, 2, 3, 4, 5, 5, 5, 1]))
        mlp.edge_lo.copy_(torch.tensor([-float("inf"), 0.0, -float("inf"), -float("inf"), -float("inf"),
                                        -float("inf"), -float("inf"), -1.0, 1.0, 0.5]))
        mlp.edge_hi.copy_(torch.tensor([0.0, float("inf"), 0.5, float("inf"), float("inf"), float("inf"), -1.0, 1.0,
                                        float("inf"), float("inf")]))
    return mlp


@pytest.mark.parametrize("basis", ["chebyshev", "taylor"])
def test_the_runtime_compiles_as_one_graph_and_matches_eager_bit_for_bit(basis):
    """vLLM's default mode compiles the model (torch.compile, CUDA graphs on a GPU): no graph break, no host sync,
    and the compiled MLP gives eager's values exactly (the basis runs as the same code, one custom op)."""
    mlp = _piecewise_mlp(basis)
    x = 3.0 * torch.randn(2, 7, 16)  # many inputs outside the calibrated intervals: the continuation is live
    torch._dynamo.reset()
    compiled = torch.compile(mlp, fullgraph=True, dynamic=True)
    with torch.inference_mode():
        assert torch.equal(compiled(x), mlp(x))
        assert torch.equal(compiled(x[:, :3]), mlp(x[:, :3]))  # another length, the same graph


def test_an_engine_re_creating_parameters_in_its_dtype_keeps_the_piece_index_integer():
    """vLLM re-creates every parameter it did not replace as an empty tensor of the model dtype, then loads the
    checkpoint into it; the piece -> channel index and the piece edges are buffers, which it loads as they are."""
    mlp = _piecewise_mlp()
    names = dict(mlp.named_parameters())
    assert not {"owner", "edge_lo", "edge_hi"} & set(names)
    assert mlp.owner.dtype == torch.long and {"owner", "edge_lo", "edge_hi"} <= set(mlp.state_dict())


def test_serve_engine_vllm_without_vllm_is_one_line_naming_the_install(tiny_release, monkeypatch, capsys):
    import importlib.util

    from taylormlp.serve import vllm_engine
    from taylormlp.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(vllm_engine.importlib.util, "find_spec",
                        lambda name, *rest: None if name == "vllm" else real(name, *rest))
    assert main(["serve", str(tiny_release), "--engine", "vllm"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "vLLM is not installed" in err and "make vllm-setup" in err and "pip install" in err


def test_vllm_settings_per_path_release_and_original(tiny_release, tiny_llama_dir, tmp_path):
    """A Llama release is native (no flag; the Transformers backend's two on request), an original gets none, a
    release whose config.json names the stock class (written before the plugin) gets the two, and asking the native
    path of such a release or an unknown path is a one-line error."""
    import json
    import shutil

    from taylormlp.common.errors import TaylorMLPError
    from taylormlp.serve import vllm_engine

    flags = ["--model-impl", "transformers", "--trust-remote-code"]
    assert vllm_engine.is_native(tiny_release) and not vllm_engine.is_native(tiny_llama_dir)
    assert vllm_engine.engine_kwargs(tiny_release) == {} and vllm_engine.cli_flags(tiny_release) == []
    assert vllm_engine.engine_kwargs(tiny_release, "native") == {}
    assert vllm_engine.engine_kwargs(tiny_release, "transformers") == vllm_engine.TRANSFORMERS_FLAGS
    assert vllm_engine.cli_flags(tiny_release, "transformers") == flags
    assert vllm_engine.engine_kwargs(tiny_release, "none") == {}
    assert vllm_engine.engine_kwargs(tiny_llama_dir) == {} and vllm_engine.cli_flags(tiny_llama_dir, "transformers") == []
    old = shutil.copytree(tiny_release, tmp_path / "old")
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**config, "architectures": config["architectures"][1:]}))
    assert not vllm_engine.is_native(old) and vllm_engine.cli_flags(old) == flags
    with pytest.raises(TaylorMLPError, match="not a release vLLM builds natively"):
        vllm_engine.engine_kwargs(old, "native")
    with pytest.raises(TaylorMLPError, match="unknown vLLM path"):
        vllm_engine.engine_kwargs(tiny_release, "sglang")
    command = vllm_engine.server_command(tiny_release, "127.0.0.1", 8123, "rel")
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"] and "--trust-remote-code" not in command
    assert "--trust-remote-code" in vllm_engine.server_command(old, "127.0.0.1", 8123, "rel")


def test_release_architectures_name_the_plugins_classes_only_where_it_builds_them():
    """config.json's architectures: TaylorMLP<class> first for the architectures with a vLLM class in the table (what
    the plugin registers, under the same names), then the stock class; the stock class alone for the rest."""
    from taylormlp import runtime
    from taylormlp.serve.vllm_plugin import native_architectures

    names = {t: runtime.release_architectures(type("C", (), {"model_type": t})) for t in runtime.ARCHITECTURES}
    stock = {t: [row["model_class"]] for t, row in runtime.ARCHITECTURES.items()}
    assert names == {**stock, "llama": ["TaylorMLPLlamaForCausalLM", "LlamaForCausalLM"],
                     "mistral": ["TaylorMLPMistralForCausalLM", "MistralForCausalLM"],
                     "qwen2": ["TaylorMLPQwen2ForCausalLM", "Qwen2ForCausalLM"]}
    assert stock["gemma3_text"] == ["Gemma3ForCausalLM"] and stock["phi"] == ["PhiForCausalLM"]
    assert native_architectures() == {n[0]: f"taylormlp.serve.vllm_native:{n[0]}" for n in names.values()
                                      if len(n) == 2}


def test_the_plugin_is_declared_for_vllm():
    """vLLM finds general plugins by entry point: the installed package declares ours."""
    from importlib.metadata import entry_points

    (plugin,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "taylormlp"]
    assert plugin.value == "taylormlp.serve.vllm_plugin:register"


def test_vllm_bench_rows_pair_each_round_with_the_originals(monkeypatch):
    """bench --engine vllm's table from injected timings: the slowdown is the median of per-round ratios against the
    original in the same round (not a ratio of medians), tok/s counts the decode steps of the whole batch."""
    from taylormlp.measure.bench import ORIGINAL
    from taylormlp.measure.throughput import throughput_rows

    def run(decode, prefill=0.1):
        return {"decode_s": decode, "prefill_s": prefill, "inter_token_s": decode / 7}

    runs = {1: {ORIGINAL: [run(1.0), run(2.0), run(1.0)], "rel": [run(3.0), run(4.0), run(5.0)]},
            8: {ORIGINAL: [run(2.0)] * 3, "rel": [run(4.0), run(8.0), run(6.0)]}}
    rows = {(r["batch"], r["name"]): r for r in throughput_rows(runs, ORIGINAL, 7)}  # 8 tokens: 7 decode steps
    assert rows[1, "rel"]["slowdown"] == 3.0 and (rows[1, "rel"]["slowdown_min"], rows[1, "rel"]["slowdown_max"]) \
        == (2.0, 5.0)  # ratios 3, 2, 5: paired by round
    assert rows[1, ORIGINAL]["slowdown"] == 1.0
    assert rows[8, "rel"]["slowdown"] == 3.0 and rows[8, "rel"]["decode_tokens_per_s"] == 8 * 7 / 6.0
    assert rows[1, "rel"]["ttft_ms"] == pytest.approx(100.0) and rows[1, "rel"]["inter_token_ms"] == pytest.approx(
        1e3 * 4.0 / 7)


def test_bench_engine_vllm_refuses_flags_it_does_not_use(tiny_release, tiny_llama_dir, capsys):
    from taylormlp.cli import main

    assert main(["bench", str(tiny_llama_dir), str(tiny_release), "--engine", "vllm", "--device", "cuda"]) == 2
    assert "--engine vllm" in capsys.readouterr().err
    assert main(["bench", str(tiny_llama_dir), str(tiny_release), "--dtype", "bfloat16"]) == 2
    assert "--dtype bfloat16 is for --engine vllm" in capsys.readouterr().err
