import os

os.environ.setdefault("TAYLORMLP_QUIET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

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
