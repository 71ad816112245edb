"""Where base models come from: a local Hugging Face directory, a ``.gguf`` file, or a built-in name.

GGUF files are dequantized tensor by tensor (gguf_convert; slow: 35-80 s on two cores), so the first load caches a
safetensors copy under ``~/.cache/taylormlp/models`` (``TAYLORMLP_CACHE`` overrides) and every later
load reads that copy in seconds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..common.choices import BUILTIN_MODELS, BuiltinModel  # noqa: F401 - the table's home is choices.py
from ..common.errors import TaylorMLPError, first_line
from ..common.files import read_json
from ..common.progress import status
from .directory import load_release
from .gguf import convert_gguf
from .kinds import refuse_release
from .stream import SafetensorsSource


def taylormlp_cache() -> Path:
    """taylormlp's cache directory: ~/.cache/taylormlp, or TAYLORMLP_CACHE."""
    return Path(os.environ.get("TAYLORMLP_CACHE", Path.home() / ".cache" / "taylormlp"))


def cache_root() -> Path:
    return taylormlp_cache() / "models"


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
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _cached_from_gguf(path)
    if path.is_dir():
        refuse_release(path)  # a release would load as its base architecture with random MLPs
        if not (path / "config.json").is_file():
            raise TaylorMLPError(f"{path} is a directory but holds no config.json; give a Hugging Face model directory")
        return path
    if not path.exists():
        raise TaylorMLPError(
            f"model source {text!r} not found: give a local model directory, a .gguf file, or one of "
            f"{', '.join(BUILTIN_MODELS)}"
        )
    raise TaylorMLPError(f"model source {text!r} is neither a model directory nor a .gguf file")


def check_gguf_file(gguf: Path) -> None:
    """Parse the GGUF header and tensor table (no dequantizing); a corrupt, truncated or mislabelled file is a
    TaylorMLPError naming it."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf)
        count = len(reader.tensors)
    except Exception as exc:  # noqa: BLE001 - the GGUF parser raises many types; any failure means a bad file
        detail = first_line(exc)
        raise TaylorMLPError(f"{gguf}: not a readable GGUF file ({detail}); it is truncated, corrupt or another format "
                             f"named .gguf: re-download or re-convert it") from exc
    if count == 0:
        raise TaylorMLPError(f"{gguf}: the GGUF file holds no tensors; give a GGUF model file")


def _cached_from_gguf(gguf: Path) -> Path:
    target = _gguf_cache_dir(gguf)
    if (target / "config.json").is_file() and (target / ".complete").is_file():
        return target

    check_gguf_file(gguf)
    root_existed = target.parent.exists()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    except OSError as exc:
        raise TaylorMLPError(f"cannot write the model cache {target.parent} ({exc.strerror or exc}); set "
                             f"TAYLORMLP_CACHE to a writable directory") from exc
    try:
        with status(f"dequantizing {gguf.name} once, tensor by tensor (cached afterwards in {target})"):
            try:
                convert_gguf(gguf, tmp)
            except (TaylorMLPError, OSError):
                raise
            except Exception as exc:  # noqa: BLE001 - any failure to convert names the file
                detail = first_line(exc)
                raise TaylorMLPError(f"{gguf}: transformers cannot convert this GGUF file ({detail}); give a GGUF of a "
                                     f"supported architecture, or a Hugging Face model directory") from exc
        (tmp / ".complete").write_text(str(gguf))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError as exc:
        raise TaylorMLPError(f"cannot write the model cache {target} ({exc.strerror or exc}; disk full or not "
                             f"writable?); set TAYLORMLP_CACHE to a writable directory with room") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not root_existed and not target.exists():
            try:  # leave no empty cache directory behind a failed conversion
                target.parent.rmdir()
            except OSError:
                pass
    return target


# the JSON files a Hugging Face model directory may hold: each must parse, and a broken one is named
MODEL_JSON_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json", "vocab.json", "model.safetensors.index.json")


def check_model_files(model_dir: Path) -> None:
    """Every JSON file of MODEL_JSON_FILES present in `model_dir` is UTF-8 JSON holding an object (a table); the
    error names the first that is not, instead of a parser message from deep inside transformers."""
    for name in MODEL_JSON_FILES:
        path = Path(model_dir) / name
        if not path.is_file():
            continue
        read_json(path, "re-download or re-save the model")


def load_base(source: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer, model_dir) for SOURCE; the model is in eval mode."""
    from transformers import AutoModelForCausalLM

    model_dir = resolve_source(source)
    check_model_files(model_dir)
    SafetensorsSource(model_dir)  # a corrupt, truncated or mislabelled weight file is named before loading
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types; each means a model it cannot load
        raise TaylorMLPError(f"could not load the model from {model_dir} ({first_line(exc)}); check that it is a "
                             f"complete Hugging Face model directory (re-download or re-save it)") from exc
    tokenizer = load_tokenizer(model_dir)
    model.eval()
    return model, tokenizer, model_dir


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    check_model_files(model_dir)
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception for a malformed tokenizer.json
        raise TaylorMLPError(f"could not load the tokenizer from {model_dir} ({first_line(exc)}); its tokenizer "
                             f"files (tokenizer.json, tokenizer_config.json, ...) are missing or damaged: re-download "
                             f"or re-save the model with its tokenizer") from exc


def is_chat_model(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def load_any(path, base: bool = False):
    """(model, tokenizer) for a release directory, or for a base model SOURCE when base=True."""
    if base:
        model, tokenizer, _ = load_base(path)
        return model, tokenizer
    model = load_release(path)
    try:
        tokenizer = load_tokenizer(Path(path))
    except TaylorMLPError as exc:
        raise TaylorMLPError(f"release {path} carries no usable tokenizer ({exc}); write releases with their "
                             f"tokenizer (save_release(model, DIR, tokenizer))") from exc
    return model, tokenizer
