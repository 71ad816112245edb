import os

os.environ.setdefault("TAYLORMLP_QUIET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from hypothesis import settings

# CI (.ci/run) uses a fixed example sequence so a run is reproducible; a developer's `make test` keeps exploring new
# examples (and replays any failure it has found from .hypothesis/).
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_models():
    """Tiny random models, one per supported architecture."""
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, MistralConfig, MistralForCausalLM, PhiConfig, PhiForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    common = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    return {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2)),
        "mistral": lambda: MistralForCausalLM(MistralConfig(**common, num_key_value_heads=2)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=2)),
        "gemma3_text": lambda: Gemma3ForCausalLM(Gemma3TextConfig(**common, num_key_value_heads=2, head_dim=8)),
        "phi": lambda: PhiForCausalLM(PhiConfig(**common)),
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_inner=48,
                                                   bos_token_id=0, eos_token_id=0)),
    }


@pytest.fixture(params=list(tiny_models()))
def tiny_model(request):
    torch.manual_seed(0)
    model = tiny_models()[request.param]().eval()
    return request.param, model


FAST = dict(continuation_tokens=12, prose_chars=6000, search_steps=4)


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The SmolLM2 tokenizer (installed by `make setup`); tiny models below share its vocabulary."""
    from transformers import AutoTokenizer

    from taylormlp.sources import resolve_source

    return AutoTokenizer.from_pretrained(resolve_source("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smol_tokenizer):
    """A tiny random Llama with SmolLM2's tokenizer and chat template, saved as a HF model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=smol_tokenizer.bos_token_id, eos_token_id=smol_tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # spread the gate pre-activations so the series has real work to do
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight.mul_(10.0)
    out = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model.save_pretrained(out)
    smol_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory, tiny_llama_dir):
    from taylormlp.pipeline import protect_to_release

    out = tmp_path_factory.mktemp("rel") / "release"
    protect_to_release(tiny_llama_dir, out, preset="default", order=12, **FAST)
    return out
