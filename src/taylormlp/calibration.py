"""Calibration: which values does each MLP channel's pre-activation z take on real inputs?

The default corpus needs no download and is the same on every machine with this package:

* prose: the documentation strings of a fixed list of Python standard-library modules (real English
  technical prose, found on any machine that runs Python);
* prompts: ``data/calibration_prompts.json`` (instructions and raw-text openings written for this
  project), each followed by the model's own greedy continuation, and for chat models wrapped in the
  model's chat template — so the ranges cover what deployment actually feeds the MLPs.

``collect_ranges`` streams texts through the model with forward hooks and records per-channel min and max
of z (the activation's input, bias included) for every layer.
"""

from __future__ import annotations

import importlib
import inspect
import json
from dataclasses import dataclass, field
from importlib.resources import files

import numpy as np
import torch

from . import runtime
from .errors import TaylorMLPError
from .progress import bar

PROSE_MODULES = (
    "json", "csv", "argparse", "logging", "pathlib", "collections", "functools", "itertools", "datetime",
    "decimal", "fractions", "statistics", "random", "textwrap", "string", "re", "shutil", "tempfile",
    "subprocess", "threading", "queue", "heapq", "bisect", "dataclasses", "enum", "typing", "contextlib",
    "unittest", "doctest", "difflib", "calendar", "zipfile", "tarfile", "gzip", "sqlite3", "email",
    "http.client", "urllib.parse", "socket", "asyncio", "inspect", "pickle", "copy", "pprint", "ast",
    "tokenize", "codecs", "locale", "gettext", "optparse", "operator", "math", "cmath", "hashlib", "hmac",
    "secrets", "uuid", "base64", "struct", "array", "weakref", "abc", "io", "os", "sys", "time",
)


def module_docstrings(modules, max_chars: int, min_len: int = 200) -> list[str]:
    """Docstrings (at least min_len characters) of `modules` and their public functions and classes."""
    texts: list[str] = []
    total = 0
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a missing optional stdlib module is fine
            continue
        docs = [inspect.getdoc(module) or ""]
        for attr in sorted(dir(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr, None)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                docs.append(inspect.getdoc(obj) or "")
        for doc in docs:
            doc = doc.strip()
            if len(doc) >= min_len:
                texts.append(doc)
                total += len(doc)
                if total >= max_chars:
                    return texts
    return texts


def stdlib_prose(max_chars: int = 200_000) -> list[str]:
    """The built-in calibration prose: docstrings of PROSE_MODULES."""
    return module_docstrings(PROSE_MODULES, max_chars)


def calibration_prompts() -> dict:
    return json.loads(files("taylormlp").joinpath("data/calibration_prompts.json").read_text())


def format_prompt(tokenizer, prompt: str, chat: bool) -> str:
    if chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


@torch.no_grad()
def greedy_sequences(model, tokenizer, prompts: list[str], max_new_tokens: int, desc: str = "generating",
                     batch_size: int = 8) -> list[dict]:
    """Prompt ids plus the model's greedy continuation (cut after EOS), one dict per prompt.

    Prompts are generated in left-padded batches; each returned sequence holds no padding."""
    encoded = [tokenizer(t, return_tensors="pt", add_special_tokens=not _has_bos(tokenizer, t)).input_ids[0]
               for t in prompts]
    pad = _pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    out = []
    batches = [encoded[i:i + batch_size] for i in range(0, len(encoded), batch_size)]
    for batch in bar(batches, desc=desc, unit="batch"):
        width = max(len(ids) for ids in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(batch):
            ids[row, width - len(seq):] = seq
            mask[row, width - len(seq):] = 1
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad)
        for row, seq in enumerate(batch):
            new = gen[row, width:]
            if eos is not None and (new == eos).any():
                new = new[: int((new == eos).nonzero()[0, 0]) + 1]
            out.append({"ids": torch.cat([seq, new]), "prompt_len": len(seq)})
    return out


def _has_bos(tokenizer, text: str) -> bool:
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and text.startswith(bos)


def _pad_id(tokenizer):
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@dataclass
class Ranges:
    """Per layer: min and max of each channel's pre-activation (float64 arrays), and tokens seen."""

    lo: list[np.ndarray]
    hi: list[np.ndarray]
    tokens: int = 0
    sources: dict = field(default_factory=dict)

    def merge(self, other: "Ranges") -> "Ranges":
        return Ranges([np.minimum(a, b) for a, b in zip(self.lo, other.lo)],
                      [np.maximum(a, b) for a, b in zip(self.hi, other.hi)],
                      self.tokens + other.tokens, {**self.sources, **other.sources})

    def summary(self) -> dict:
        widths = np.concatenate([h - l for l, h in zip(self.lo, self.hi)])
        return {"tokens": int(self.tokens), "sources": self.sources,
                "width_median": float(np.median(widths)), "width_max": float(widths.max())}


def _preactivation_module(mlp, arch):
    return getattr(mlp, arch["gate"])


@torch.no_grad()
def collect_ranges(model, sequences: list[torch.Tensor], desc: str = "calibrating") -> Ranges:
    """Run token-id sequences through the model; record per-channel min/max of every MLP's z."""
    arch = runtime.architecture(model.config)
    layers = runtime.decoder_layers(model)
    lo = [None] * len(layers)
    hi = [None] * len(layers)
    hooks = []

    def hook_for(i):
        def hook(_module, _inputs, output):
            z = output.detach().reshape(-1, output.shape[-1]).to(torch.float64)
            if not torch.isfinite(z).all():
                raise TaylorMLPError(f"layer {i}: non-finite MLP pre-activations during calibration "
                                     f"(NaN or Inf weights in the model?)")
            mn, mx = z.min(0).values.numpy(), z.max(0).values.numpy()
            lo[i] = mn if lo[i] is None else np.minimum(lo[i], mn)
            hi[i] = mx if hi[i] is None else np.maximum(hi[i], mx)
        return hook

    for i, layer in enumerate(layers):
        hooks.append(_preactivation_module(layer.mlp, arch).register_forward_hook(hook_for(i)))
    tokens = 0
    try:
        for ids in bar(sequences, desc=desc, unit="seq"):
            ids = ids.reshape(1, -1)
            # only the MLP pre-activations matter here: skip the (large) vocabulary projection
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, logits_to_keep=1)
            tokens += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    if tokens == 0:
        raise TaylorMLPError("calibration saw no tokens: the calibration text is empty; give a non-empty corpus")
    return Ranges(lo, hi, tokens)


def tokenize_chunks(tokenizer, texts: list[str], max_length: int) -> list[torch.Tensor]:
    """Tokenize texts into sequences of at most max_length tokens (long texts are split)."""
    chunks = []
    for text in texts:
        if not text or not text.strip():
            continue
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        for start in range(0, len(ids), max_length):
            piece = ids[start:start + max_length]
            if len(piece) >= 2:
                chunks.append(piece)
    return chunks
