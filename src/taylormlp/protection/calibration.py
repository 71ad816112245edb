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

import contextlib
import json
import math
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch

from .. import runtime
from ..common.corpus import stdlib_prose
from ..common.errors import TaylorMLPError
from ..common.files import read_text
from ..common.hooks import HookSet
from ..common.progress import bar, log
from ..measure.decode import continuation_logits, input_device, padded_batches
from ..measure.generate import eos_ids, format_prompt, greedy_sequences
from .options import ProtectOptions

def calibration_prompts() -> dict:
    return json.loads(files("taylormlp").joinpath("data/calibration_prompts.json").read_text())


@dataclass
class Ranges:
    """Per layer: min and max of each channel's pre-activation (float64 arrays), and tokens seen."""

    lo: list[np.ndarray]
    hi: list[np.ndarray]
    tokens: int = 0
    sources: dict = field(default_factory=dict)

    def summary(self) -> dict:
        widths = np.concatenate([h - l for l, h in zip(self.lo, self.hi)])
        return {"tokens": int(self.tokens), "sources": self.sources,
                "width_median": float(np.median(widths)), "width_max": float(widths.max())}


class RangeRecorder:
    """While active (a context manager), records per-channel min and max of every MLP's pre-activation z over the
    real tokens that run through `model`: padding (attention mask 0) and, in generation, tokens after a row's EOS are
    left out.  Works on a model held in memory and on a streamed one alike (hooks on the gate linear maps)."""

    def __init__(self, model, eos_ids=()):
        self.model = model
        self.arch = runtime.architecture(model.config)
        self.layers = runtime.decoder_layers(model)
        self.lo: list = [None] * len(self.layers)
        self.hi: list = [None] * len(self.layers)
        self.tokens = 0
        self.eos = torch.tensor(sorted(eos_ids), dtype=torch.long)
        self.mask = None
        self.finished = None
        self.rows = None
        self.hooks = HookSet()

    def new_batch(self, rows: torch.Tensor | None = None) -> None:
        """The next forward call starts a new batch (a prefill), not a decode step of the last one; `rows` (bool
        per batch row) says which rows to record (default: all)."""
        self.finished = None
        self.rows = rows

    def __enter__(self):
        self.hooks.pre(self.model, self._top, with_kwargs=True)
        for i, layer in enumerate(self.layers):
            self.hooks.post(getattr(layer.mlp, self.arch["gate"]), self._hook(i))
        return self

    def __exit__(self, *exc):
        self.hooks.remove()
        return False

    def _top(self, _module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            self.mask = None
            return None
        T = ids.shape[1]
        am = kwargs.get("attention_mask")
        mask = am[:, -T:].bool() if am is not None and am.dim() == 2 else torch.ones_like(ids, dtype=torch.bool)
        mask = mask.cpu()
        if self.finished is None:  # a prefill (or a plain forward)
            self.finished = torch.zeros(ids.shape[0], dtype=torch.bool)
        else:  # a decode step: rows that already emitted EOS only produce padding now
            mask = mask & ~self.finished[:, None]
            if self.eos.numel():
                self.finished |= torch.isin(ids[:, -1].cpu(), self.eos)
        if self.rows is not None and self.rows.shape[0] == mask.shape[0]:
            mask = mask & self.rows[:, None]
        self.mask = mask
        self.tokens += int(mask.sum())
        return None

    def _hook(self, i):
        def hook(_module, _inputs, output):
            z = output.detach()
            if self.mask is not None and self.mask.shape == z.shape[:2]:
                z = z[self.mask.to(z.device)]
            z = z.reshape(-1, z.shape[-1])
            if z.shape[0] == 0:
                return
            mn, mx = torch.aminmax(z, dim=0)  # NaN propagates: a non-finite z shows in its channel's min or max
            mn, mx = mn.to("cpu", torch.float64).numpy(), mx.to("cpu", torch.float64).numpy()
            if not (np.isfinite(mn).all() and np.isfinite(mx).all()):
                raise TaylorMLPError(f"layer {i}: non-finite MLP pre-activations during calibration "
                                     f"(NaN or Inf weights in the model?)")
            self.lo[i] = mn if self.lo[i] is None else np.minimum(self.lo[i], mn)
            self.hi[i] = mx if self.hi[i] is None else np.maximum(self.hi[i], mx)
        return hook

    def ranges(self) -> "Ranges":
        if self.tokens == 0 or any(lo is None for lo in self.lo):
            raise TaylorMLPError("calibration saw no tokens: the calibration text is empty; give a non-empty corpus")
        return Ranges(list(self.lo), list(self.hi), self.tokens)


@torch.no_grad()
def collect_ranges(model, sequences: list[torch.Tensor], desc: str = "calibrating", max_tokens: int = 4096,
                   recorder: "RangeRecorder | None" = None) -> Ranges:
    """Run token-id sequences through the model (padded batches of at most `max_tokens` tokens); record per-channel
    min/max of every MLP's z.  With a `recorder`, add to its ranges instead of starting new ones."""
    own = recorder is None
    rec = RangeRecorder(model) if own else recorder
    device = input_device(model)
    batches = list(padded_batches(sequences, max_tokens))
    with (rec if own else contextlib.nullcontext()):
        for _, ids, mask in bar(batches, desc=desc, unit="batch"):
            rec.new_batch()
            # only the MLP pre-activations matter here: skip the (large) vocabulary projection
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, logits_to_keep=1)
    return rec.ranges()


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


# ---------------------------------------------------------------- calibration and validation data


@dataclass
class CalibrationData:
    calibration: list[torch.Tensor]  # prose chunks (prompt sequences were recorded while they were generated)
    validation: list[dict]  # {"ids", "prompt_len", "logits"}: the original's logits on the continuation
    sources: dict = field(default_factory=dict)


def spread(items: list, limit: int | None) -> list:
    """At most `limit` items, evenly spread over the list (all of them when limit is None)."""
    if limit is None or limit >= len(items):
        return list(items)
    return [items[int(k)] for k in np.linspace(0, len(items) - 1, limit).round().astype(int)]


@torch.no_grad()
def calibrate(model, tokenizer, texts: list[str] | None, opts: ProtectOptions,
              chat: bool | None = None, validation_every: int = 5) -> tuple[CalibrationData, Ranges]:
    """Calibration ranges and validation data, in as few passes over the model as possible (each pass onloads
    every layer of a streamed model once per batch):

    1. all prompts are generated (greedy, batched); the calibration prompts' ranges are recorded on the way —
       prompt and continuation tokens need no second pass — while the validation prompts (every
       `validation_every`-th) share the batches but never enter the ranges;
    2. the prose chunks run through in padded batches, recorded the same way;
    3. the original's logits on the validation continuations are kept as the reference."""
    opts = opts.resolved()
    if tokenizer is None:
        raise TaylorMLPError("protect() needs the tokenizer to calibrate on text")
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    missing: list[str] = []
    if texts is None:
        texts = stdlib_prose(opts.prose_chars, missing)
        prose_name = "python-stdlib-docstrings"
        if missing:
            log(f"calibration prose: this Python lacks {', '.join(missing)}; their docstrings are left out, so the "
                f"ranges differ from those of a full standard library")
    else:
        prose_name = "user-corpus"
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise TaylorMLPError("the calibration text is empty; give a file with real text (--calibration FILE)")
    chunks = spread(tokenize_chunks(tokenizer, texts, opts.max_length), opts.calibration_samples)
    if not chunks:
        raise TaylorMLPError("the calibration text is too short: it tokenizes to fewer than 2 tokens")
    prompts = calibration_prompts()
    formatted = [format_prompt(tokenizer, p, True) for p in prompts["chat"]] if chat else []
    formatted = spread(formatted + prompts["raw"], opts.calibration_samples)
    is_valid = [i % validation_every == validation_every - 1 for i in range(len(formatted))]
    with RangeRecorder(model, eos_ids(tokenizer, model)) as recorder:
        # all prompts generate together (fewer passes over the layers); validation rows are not recorded
        seqs = greedy_sequences(model, tokenizer, formatted, opts.continuation_tokens, desc="prompts",
                                batch_size=opts.batch_size, recorder=recorder,
                                record=[not v for v in is_valid]) if formatted else []
        collect_ranges(model, chunks, desc="calibration prose", max_tokens=opts.batch_tokens, recorder=recorder)
    ranges = recorder.ranges()
    valid = [seq for seq, v in zip(seqs, is_valid) if v]
    calib_prompts = [seq for seq, v in zip(seqs, is_valid) if not v]
    for k, logits in continuation_logits(model, valid, opts.batch_tokens):
        valid[k]["logits"] = logits
    valid.sort(key=logit_margin)  # most fragile first: a walk that may stop early meets failures soonest
    sources = {prose_name: len(chunks), "prompts+continuations": len(calib_prompts), "validation": len(valid)}
    if missing:
        sources["prose_modules_missing"] = missing
    ranges.sources = sources
    return CalibrationData(chunks, valid, sources), ranges


def logit_margin(seq: dict) -> float:
    """The smallest gap between the original's top two logits over a validation continuation: how far its greedy
    choice is from flipping.  Candidates fail first on the sequences with the smallest margin."""
    top2 = seq["logits"].topk(2, dim=-1).values if seq["logits"].shape[-1] > 1 else None
    return float((top2[:, 0] - top2[:, 1]).min()) if top2 is not None and len(top2) else math.inf


def read_calibration_file(path: Path) -> list[str]:
    if path.is_dir():
        raise TaylorMLPError(f"--calibration {path} is a directory; give a UTF-8 text file (paragraphs separated by "
                             f"blank lines)")
    if not path.is_file():
        raise TaylorMLPError(f"--calibration {path}: calibration file not found")
    text = read_text(path, "give a UTF-8 text file (paragraphs separated by blank lines)", f"calibration file {path}")
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not paragraphs:
        raise TaylorMLPError(f"calibration file {path} is empty; give real text")
    return paragraphs
