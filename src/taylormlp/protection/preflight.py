"""The pre-flight of a protect run: what it will need, from the config and the safetensors headers alone.

Before calibration (no weight is read) `estimate` works out

* the release's size: every tensor but the decoder MLPs copied in the release dtype, and per layer the
  TaylorMLP's tensors (runtime.TaylorMLP) with Θ sized by the one cost model, protector.channel_work
  (d·(N+1)·q values per protected channel of q pieces).  The pieces per channel are known only after calibration,
  and a searched coverage only after the search, so the figure checked is a bound: the given --coverage (or 1)
  with the preset's --max-pieces in every channel; with --max-pieces 1 and a given --coverage it is the size;
* the peak memory of the streamed run (stream.open_streamed): the process as it is now, the resident tensors
  (embeddings, norms, head) counted twice (the file's pages and the copy, measured: x2.0 on 49k- and 128k-vocabulary
  models), and the larger of one layer's calibration (the layer, its activations) and one layer's candidate
  TaylorMLP (the layer's attention, the candidate's tensors, the float64 blocks build_taylor_mlp makes, the
  series features of a validation batch), plus the original's validation logits;
* a rough time on this machine: seconds per parameter per calibration sample, measured on a 2-core x86 machine
  (a 32-layer Llama-3-8B shape, paper preset, 16 samples: 458 s), scaled by torch's thread count.

`check` refuses a run whose release bound does not fit on the file system of --out (free_space, which tests
patch) or whose peak does not fit into the available memory (machine.available_memory), with one line naming the
numbers and the ways out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import runtime
from ..common import machine
from ..common.choices import DTYPE_NAMES
from ..common.errors import TaylorMLPError
from ..common.paths import free_space, nearest_existing  # free_space: looked up at each call (tests patch it here)
from ..measure.cost import channel_work
from ..release import stream
from ..release.directory import RUNTIME_FILES
from ..release.shards import SAFETENSORS_DTYPES
from ..release.stream import SafetensorsSource, mlp_tensor_names
from .options import ProtectOptions

RESIDENT_FACTOR = 2.0  # peak RSS per byte of resident tensors (file pages + copy while loading), measured
SECONDS_PER_PARAM_SAMPLE = 3.9e-9  # 2 threads, x86: 13.7 s per Llama-3-8B layer (218M parameters) at 16 samples
RATE_THREADS = 2
FIXED_SECONDS = 20.0  # imports, loading the resident tensors, the model card and manifest
DEFAULT_SAMPLES = (230, 112)  # the built-in corpus: prose chunks, prompts (--calibration-samples None)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
SMALL_FILES = 1 << 20  # config, model card, manifest, index and safetensors headers: well under a megabyte
PROMPT_TOKENS = 64  # a built-in calibration prompt, about (chat template included)


@dataclass
class Estimate:
    model: str
    layers: int
    hidden: int
    channels: int  # MLP channels per layer
    dtype: str
    order: int
    coverage: float | None  # None: searched
    max_pieces: int
    release_bytes: int  # the bound: the given coverage (or 1), max_pieces in every channel
    release_floor_bytes: int  # one piece per channel at the given coverage (or 0)
    peak_bytes: int
    parts: dict = field(default_factory=dict)  # peak memory's terms
    phases: dict = field(default_factory=dict)  # "one layer": the larger of its calibration and its candidate
    seconds: float | None = None  # None: not estimated (a GPU run)
    free_bytes: int | None = None
    free_where: str = ""
    available_bytes: int | None = None
    current_bytes: int = 0  # this process's RSS now (already spent: not part of what must be available)
    whole: bool = False  # --slowdown: the model is held whole, the release size is known only after the choice

    @property
    def exact(self) -> bool:
        return self.coverage is not None and self.max_pieces == 1

    def table(self) -> list[str]:
        cover = "searched: at most 1" if self.coverage is None else f"{self.coverage:g}"
        layers = f"{self.layers} layer{'s' if self.layers > 1 else ''}"
        head = (f"pre-flight: {self.model}: {layers}, hidden {self.hidden}, {self.channels} MLP channels per layer; "
                f"release {self.dtype}, order {self.order}, coverage {cover}, {_pieces(self.max_pieces)} per channel")
        free = "unknown" if self.free_bytes is None else f"{gb(self.free_bytes)} free on {self.free_where}"
        if self.whole:
            size = "known after --slowdown's choice of order and coverage (not checked)"
        elif self.exact:
            size = f"{gb(self.release_bytes)} (this coverage, one piece per channel: the size)"
        else:
            size = (f"at most {gb(self.release_bytes)}, at least {gb(self.release_floor_bytes)} (one piece per "
                    f"channel{'' if self.coverage is not None else ', coverage 0'})")
        avail = "unknown" if self.available_bytes is None else f"{gb(self.available_bytes + self.current_bytes)}"
        parts = ", ".join(f"{k} {gb(v)}" for k, v in self.parts.items())
        when = ("not estimated on a GPU" if self.seconds is None else
                f"~{duration(self.seconds)} (rough: {torch.get_num_threads()} threads here, rate measured on 2 cores)")
        return [head,
                f"  release size  {size}; {free}",
                f"  peak memory   about {gb(self.peak_bytes)} ({parts}); available {avail}",
                f"  time          {when}"]


def _pieces(n: int) -> str:
    return "one piece" if n == 1 else f"up to {n} pieces"


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min" if seconds >= 90 else \
        f"{seconds:.0f} s"


def rss_now() -> int:
    """This process's resident set in bytes (0 where /proc is not there)."""
    return machine.proc_kb("/proc/self/status", "VmRSS") or 0


def _floating(kind: str) -> bool:
    return kind.startswith("F") or kind == "BF16"


def _numel(shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


def mlp_bytes(arch: dict, hidden: int, channels: int, protected: int, pieces: int, order: int, has_b: bool,
              has_c: bool, width: int) -> int:
    """Bytes of one layer's TaylorMLP (runtime.TaylorMLP's tensors) with `protected` of `channels` channels and
    `pieces` series pieces in all, in a dtype of `width` bytes."""
    gated = arch["up"] is not None
    rest = channels - protected
    theta = int(channel_work(hidden, order, np.full(protected, pieces // max(protected, 1)))[0].sum()) \
        if protected else 0
    values = protected * hidden * (2 if gated else 1) + 2 * pieces + theta
    values += rest * hidden * (3 if gated else 2) + (rest if has_b and rest else 0)
    values += hidden if has_c and protected == 0 else 0
    owner = 8 * pieces + 2 * width * pieces if pieces > protected else 0  # piece -> channel (int64), edges
    return values * width + owner


def estimate(model_dir, opts: ProtectOptions, dtype: str, out, device: str = "cpu", whole: bool = False) -> Estimate:
    """The pre-flight of protecting `model_dir` into `out` (see the module docstring); reads no weights."""
    opts = opts.resolved()
    config = stream.read_config(model_dir)
    source = SafetensorsSource(model_dir)
    arch = runtime.architecture(config)
    width = torch.empty((), dtype=getattr(torch, dtype)).element_size() if dtype in DTYPE_NAMES else 4
    prefix = arch["layers"] + "."
    layers = 0
    while mlp_tensor_names(arch, layers)["V"] in source:
        layers += 1
    if layers == 0:
        raise TaylorMLPError(f"{model_dir}: no decoder MLP weights found in its safetensors files "
                             f"({mlp_tensor_names(arch, 0)['V']!r} missing); the checkpoint does not match config.json")
    names = mlp_tensor_names(arch, 0)
    gate_shape = source.header[names["V"]][1]
    hidden = int(getattr(config, "hidden_size", None) or getattr(config, "n_embd"))
    channels = int(gate_shape[1] if arch["conv1d"] else gate_shape[0])
    has_b, has_c = names["b"] in source, names["c"] in source

    def size(name):  # bytes of a source tensor once in the release (floating tensors cast to the release dtype)
        kind, shape = source.header[name]
        return _numel(shape) * (width if _floating(kind) else SAFETENSORS_DTYPES[kind])

    mlp_names = {n for i in range(layers) for n in mlp_tensor_names(arch, i).values() if n and n in source}
    resident = sum(size(n) for n in source.names() if not n.startswith(prefix))
    layer_other = sum(size(n) for n in source.names() if n.startswith(prefix) and n not in mlp_names) // layers
    layer0 = [n for n in mlp_tensor_names(arch, 0).values() if n and n in source]
    mlp_values = sum(_numel(source.header[n][1]) for n in layer0)  # one layer's MLP weights
    source_mlp = sum(_numel(source.header[n][1]) * SAFETENSORS_DTYPES[source.header[n][0]] for n in layer0)
    cov = 1.0 if opts.coverage is None else float(opts.coverage)
    P = int(round(cov * channels))
    Q = P * opts.max_pieces
    bound = mlp_bytes(arch, hidden, channels, P, Q, opts.order, has_b, has_c, width)
    P0 = int(round((opts.coverage or 0.0) * channels))
    floor = mlp_bytes(arch, hidden, channels, P0, P0, opts.order, has_b, has_c, width)
    small = SMALL_FILES + sum(path.stat().st_size for path in RUNTIME_FILES.values()) + sum(
        (Path(model_dir) / f).stat().st_size for f in TOKENIZER_FILES if (Path(model_dir) / f).is_file())
    base = resident + layers * layer_other + small

    # peak memory, by the terms of the module docstring
    prose, prompts = DEFAULT_SAMPLES if opts.calibration_samples is None else (
        min(opts.calibration_samples, DEFAULT_SAMPLES[0]), min(opts.calibration_samples, DEFAULT_SAMPLES[1]))
    valid = max(prompts // 5, 1)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1))
    tokens = min(opts.batch_tokens, prose * opts.max_length)
    calib = (layer_other + mlp_values * width + tokens * (3 * channels + 6 * hidden) * width
             + tokens * heads * opts.max_length * 4)
    val_tokens = min(opts.batch_tokens, valid * (PROMPT_TOKENS + opts.continuation_tokens))
    candidate = (layer_other + bound + source_mlp + 2 * Q * hidden * 8  # W's columns and one order's Θ, float64
                 + val_tokens * (opts.order + 1 + 4) * Q * 4)  # the [tokens, N+1, Q] features, z, u, live
    logits = valid * opts.continuation_tokens * vocab * 4
    current = rss_now()
    held = resident + (layers * (layer_other + mlp_values * width) if whole else 0)
    parts = {"this process now": current, "resident tensors": int(RESIDENT_FACTOR * held),
             "one layer": max(calib, candidate), "validation logits": logits}
    peak = sum(parts.values())
    params = sum(_numel(shape) for _, shape in source.header.values())
    passes = 1.0 if opts.coverage is not None else 1.0 + 0.1 * opts.search_steps
    seconds = None if device == "cuda" else (
        FIXED_SECONDS + SECONDS_PER_PARAM_SAMPLE * params * max(prose, prompts) * passes
        * RATE_THREADS / max(torch.get_num_threads(), 1))
    return Estimate(model=str(model_dir), layers=layers, hidden=hidden, channels=channels, dtype=dtype,
                    order=int(opts.order), coverage=opts.coverage, max_pieces=int(opts.max_pieces),
                    release_bytes=base + layers * bound, release_floor_bytes=base + layers * floor, peak_bytes=peak,
                    parts=parts, phases={"calibration": calib, "candidate": candidate}, seconds=seconds,
                    free_bytes=free_space(out), free_where=str(nearest_existing(Path(out).absolute())),
                    available_bytes=machine.available_memory(), current_bytes=current, whole=whole)


def check(est: Estimate) -> None:
    """Refuse, with one line naming the numbers and the ways out, a run whose release bound does not fit on --out's
    file system or whose peak memory does not fit into what is available."""
    ways = []
    if est.dtype == "float32":
        ways.append("--dtype bfloat16")
    ways.append("a lower --coverage" if est.coverage is None or est.coverage > 0 else None)
    ways.append("a lower --order" if est.order > 1 else None)
    if est.max_pieces > 1:
        ways.append("--max-pieces 1")
    ways = [w for w in ways if w]
    if not est.whole and est.free_bytes is not None and est.release_bytes > est.free_bytes:
        what = "the release will need" if est.exact else "the release may need up to"
        raise TaylorMLPError(
            f"{what} {gb(est.release_bytes)} ({est.dtype}, coverage "
            f"{'up to 1 (searched)' if est.coverage is None else f'{est.coverage:g}'}, {_pieces(est.max_pieces)} per "
            f"channel, order {est.order}) but {est.free_where} has {gb(est.free_bytes)} free; nothing was done: "
            f"use {', '.join(ways + ['another --out on a larger disk'])}")
    if est.available_bytes is not None and est.peak_bytes - est.current_bytes > est.available_bytes:
        raise TaylorMLPError(
            f"protect would need about {gb(est.peak_bytes)} of memory at its peak (resident tensors "
            f"{gb(est.parts['resident tensors'])}, one layer {gb(est.parts['one layer'])}) but "
            f"{gb(est.available_bytes + est.current_bytes)} is available; nothing was done: use "
            f"{', '.join(ways) or 'a machine with more memory'}")
