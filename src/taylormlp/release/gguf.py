"""GGUF -> safetensors model directory, one tensor at a time.

transformers' own GGUF loading (``from_pretrained(gguf_file=...)``) dequantizes every tensor into one state dict
and then builds the model: the whole model in float32 in memory, twice at its peak.  Here the same pieces of
transformers decide everything that is model specific — the config (``AutoConfig`` reads the GGUF metadata), the
GGUF -> Hugging Face tensor names (``get_gguf_hf_weights_map`` over a meta-device model) and the per-architecture
fixes (its ``TENSOR_PROCESSORS``: Llama's q/k permutation, Gemma's norm offset, GPT-2's transposes) — while the
tensors themselves are dequantized one by one (``gguf.GGUFReader`` maps the file lazily) and written to
safetensors shards of at most ``shard_bytes``.  Peak memory: one shard plus one tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..common.errors import TaylorMLPError
from ..common.progress import bar

SHARD_BYTES = 2 * 1024 ** 3


def convert_gguf(gguf: Path, out: Path, shard_bytes: int = SHARD_BYTES) -> None:
    """Write `gguf` as a float32 Hugging Face model directory (config, generation config, tokenizer, sharded
    safetensors with index) into the existing, empty directory `out`."""
    from gguf import GGUFReader, dequantize
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the tensors written are plain float32
    parsed = load_gguf_checkpoint(str(gguf), return_tensors=False)
    parsed["tensors"] = {}
    reader = GGUFReader(gguf)
    architecture = read_field(reader, "general.architecture")[0]
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    names = get_gguf_hf_weights_map(skeleton, processor)
    expected = set(skeleton.state_dict())
    tied = {name for name in expected if _is_tied(skeleton, name)}

    shard: dict[str, torch.Tensor] = {}
    size = 0
    files: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0

    def flush() -> None:
        nonlocal shard, size
        if not shard:
            return
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        files.append(name)
        for key in shard:
            weight_map[key] = name
        shard, size = {}, 0

    for tensor in bar(reader.tensors, desc="dequantizing GGUF", unit="tensor"):
        result = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                   tensor_key_mapping=names, parsed_parameters=parsed)
        if result.name not in names:
            continue
        value = torch.from_numpy(np.array(result.weights, dtype=np.float32))  # a writable float32 copy
        shard[names[result.name]] = value
        size += value.numel() * 4
        total += value.numel() * 4
        if size >= shard_bytes:
            flush()
    flush()
    missing = sorted(expected - set(weight_map) - tied)
    if missing:
        raise TaylorMLPError(f"{gguf}: the GGUF file lacks tensors the {config.model_type} model needs "
                             f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); it is incomplete "
                             f"or of another architecture")
    if len(files) == 1:  # one file: the plain single-file name, as save_pretrained writes it
        (out / files[0]).rename(out / "model.safetensors")
    else:
        renamed = {}
        for k, name in enumerate(files):
            final = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
            (out / name).rename(out / final)
            renamed[name] = final
        index = {"metadata": {"total_size": total},
                 "weight_map": {key: renamed[name] for key, name in sorted(weight_map.items())}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.dtype = torch.float32
    config.architectures = [type(skeleton).__name__]
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def _is_tied(model, name: str) -> bool:
    """A parameter that shares its storage with the input embeddings (a tied output head): not stored."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    out = model.get_output_embeddings()
    return out is not None and name.endswith("weight") and model.get_parameter(name) is out.weight \
        and model.get_input_embeddings().weight is out.weight
