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
