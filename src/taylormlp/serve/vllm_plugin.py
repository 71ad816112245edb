"""taylormlp's vLLM plugin: vLLM calls ``register`` in each of its processes (entry point group
``vllm.general_plugins``, pyproject.toml), which registers one model class per architecture the runtime's table gives a
vLLM class, under the name a release writes first in config.json's ``architectures`` (TaylorMLPLlamaForCausalLM, ...).
Registered lazily (``module:Class``), so vLLM imports vllm_native.py only when it builds a release; no vLLM class of a
stock model is replaced.  Without taylormlp installed vLLM knows no such name and takes the next, the stock class,
which refuses the release with runtime.LOAD_NOTICE (config.json masks the activation)."""

from __future__ import annotations

from .. import runtime


def native_architectures() -> dict[str, str]:
    """{architecture a release names: "taylormlp.serve.vllm_native:Class"} for every architecture vLLM runs natively."""
    names = [runtime.architecture_name(entry) for entry in runtime.ARCHITECTURES.values() if entry["vllm"]]
    return {name: f"taylormlp.serve.vllm_native:{name}" for name in names}


def register() -> None:
    """Register the release architectures with vLLM's ModelRegistry (re-entrant: vLLM calls it in every process)."""
    from vllm import ModelRegistry

    known = set(ModelRegistry.get_supported_archs())
    for name, target in native_architectures().items():
        if name not in known:
            ModelRegistry.register_model(name, target)
