import os
import socket

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


# ---------------------------------------------------------------- tiny random models: the one factory
# Per architecture: (config class, model class, how the factory's sizes are named in that config, fixed extras).
TINY_ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "hf", dict(num_attention_heads=4, num_key_value_heads=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", "hf", dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "hf", dict(num_attention_heads=4, num_key_value_heads=2)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", "hf",
                    dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8)),
    "phi": ("PhiConfig", "PhiForCausalLM", "hf", dict(num_attention_heads=4)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", "gpt2", dict(n_head=4, bos_token_id=0, eos_token_id=0)),
}


def tiny(arch="llama", vocab=128, hidden=32, inter=64, layers=2, seed=0, **config):
    """A tiny random causal LM of `arch` (a TINY_ARCHS key) in eval mode, initialised after torch.manual_seed(seed);
    `config` overrides or adds config fields (tie_word_embeddings=True, activation_function="gelu", ...)."""
    import transformers

    config_name, model_name, naming, extras = TINY_ARCHS[arch]
    if naming == "gpt2":
        sizes = dict(vocab_size=vocab, n_embd=hidden, n_inner=inter, n_layer=layers)
    else:
        sizes = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers)
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_name)(**{**sizes, **extras, **config})
    return getattr(transformers, model_name)(cfg).eval()


def tiny_llama(vocab=128, hidden=32, inter=64, layers=2, seed=0, **config):
    """The tiny random Llama most tests use."""
    return tiny("llama", vocab, hidden, inter, layers, seed, **config)


@pytest.fixture(params=list(TINY_ARCHS))
def tiny_model(request):
    """(architecture, tiny random model), one per supported architecture (intermediate size 48)."""
    return request.param, tiny(request.param, inter=48)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests (timings and the tiny models' numbers), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAST = dict(continuation_tokens=12, prose_chars=6000, search_steps=4)


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The SmolLM2 tokenizer (installed by `make setup`); tiny models below share its vocabulary.  Where the built-in
    model is not installed (the GPU machine of benchmarks/gpu_check.sh), TAYLORMLP_TEST_TOKENIZER names a directory
    holding its tokenizer files."""
    from transformers import AutoTokenizer

    from taylormlp.release.sources import resolve_source

    return AutoTokenizer.from_pretrained(os.environ.get("TAYLORMLP_TEST_TOKENIZER")
                                         or resolve_source("smollm2-135m-instruct"))


def save_tiny_chat_model(out, tokenizer, attention_scale: float = 1.0, gate_scales=None, **sizes):
    """A tiny random Llama with `tokenizer`'s vocabulary and chat template, saved as a HF model directory `out`.
    Its gate pre-activations are spread so the series has real work to do; `attention_scale` > 1 scales the
    attention projections so that its greedy generations depend on the prompt (at 1 they repeat one token);
    `gate_scales`: the spread per layer (default 10 each); `sizes`: tiny_llama's (hidden, inter, layers, config)."""
    model = tiny_llama(vocab=len(tokenizer), tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, **sizes)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.mlp.gate_proj.weight.mul_(10.0 if gate_scales is None else gate_scales[i])
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.self_attn, name).weight.mul_(attention_scale)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smol_tokenizer):
    """A tiny random Llama with SmolLM2's tokenizer and chat template, saved as a HF model directory."""
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", smol_tokenizer)


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory, tiny_llama_dir):
    from taylormlp.protection.flow import protect_to_release

    out = tmp_path_factory.mktemp("rel") / "release"
    protect_to_release(tiny_llama_dir, out, preset="default", order=12, **FAST)
    return out
