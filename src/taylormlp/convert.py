"""protect(): turn a transformers causal LM's MLPs into TaylorMLP modules, in place.

For layer ℓ and protected channel j (activation coordinates a = z + b, calibrated interval [lo_j, hi_j]):

    mid_j = (lo_j + hi_j)/2,  h_j = (hi_j - lo_j)/2,  t = (a - mid_j)/h_j
    act(a) ≈ Σ_n c_{j,n} φ_n(t)                         (series.series_coefficients)
    Θ_{·,n,j} = W_{·,j} · c_{j,n} · s_jⁿ                 (s_j = ±1 sign obfuscation)
    released gate row = s_j V_j,  released z0_j = s_j (mid_j - b_j)

The bias b_j lives only inside c_{j,n} (through mid_j) and z0_j; the output bias c is folded into Θ_0
(c / P added to every protected channel's order-0 column).  W and the biases of protected channels are
not stored anywhere in the module.

A channel may be served by several pieces (split_pieces): each piece q is the same construction over its own
sub-interval, Θ_{·,n,q} = W_{·,j(q)} · c_{q,n} · s_jⁿ, live on its part of the line.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from . import runtime, series
from .calibration import (RangeRecorder, Ranges, _eos_ids, _input_device, calibration_prompts, collect_ranges,
                          format_prompt,
                          greedy_sequences, padded_batches, stdlib_prose, tokenize_chunks)
from .errors import TaylorMLPError
from .progress import bar, log
from .stream import release_memory

PRESETS = {
    # the paper: Taylor series around the midpoint, narrowest channels first
    "paper": dict(basis="taylor", selection="width", order=8, margin=0.0, error_budget=0.1, max_pieces=1),
    # this project's default: near-minimax Chebyshev interpolant, channels ranked by their output error
    "default": dict(basis="chebyshev", selection="error", order=8, margin=0.5, error_budget=0.1, max_pieces=8),
}


@dataclass
class ProtectOptions:
    preset: str = "default"
    basis: str | None = None
    order: int | None = None
    coverage: float | None = None  # None: as large as possible while token-exact on validation
    selection: str | None = None
    margin: float | None = None  # widen each calibrated interval by this share of its width on each side
    seed: int = 0
    continuation_tokens: int = 48
    max_length: int = 256
    prose_chars: int = 30_000
    search_steps: int = 9
    # the coverage search accepts a coverage only if validation is token-exact AND the largest logit error stays
    # within this budget: exactness on validation alone leaves no margin for unseen prompts
    error_budget: float | None = None
    # how far past its calibrated interval a channel's series is trusted before the runtime's linear continuation
    # takes over: as far as |series - activation| <= max(in-interval error, trust_tolerance), at most trust_max
    # half widths (0 disables: clamp at the calibrated edge)
    trust_tolerance: float = 1e-3
    trust_max: float = 4.0
    # piecewise series: split a channel's interval (bisection, worst piece first) while the degree-N series misses
    # the activation by more than piece_tolerance, up to max_pieces pieces per channel.  Every piece is real
    # series work at run time (its own Θ block), so pieces also raise the cost per token.
    max_pieces: int | None = None
    piece_tolerance: float = 1e-4
    piece_order: int | None = None  # decide the pieces as if the order were this (the throttle keeps them fixed)
    # how much calibration work: at most this many prose chunks and this many prompts (None: the whole corpus)
    calibration_samples: int | None = None
    batch_size: int = 128  # prompts generated together (a streamed model onloads each layer once per step and batch)
    batch_tokens: int = 4096  # padded tokens per forward pass in calibration and validation

    def resolved(self) -> "ProtectOptions":
        if self.preset not in PRESETS:
            raise TaylorMLPError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        out = ProtectOptions(**asdict(self))
        for key, value in PRESETS[self.preset].items():
            if getattr(out, key) is None:
                setattr(out, key, value)
        if out.basis not in runtime.BASES:
            raise TaylorMLPError(f"--basis must be one of {', '.join(runtime.BASES)}, got {out.basis!r}")
        if not 1 <= out.order <= series.MAX_ORDER:
            raise TaylorMLPError(f"--order must be between 1 and {series.MAX_ORDER}, got {out.order}")
        if out.coverage is not None and not 0.0 <= out.coverage <= 1.0:
            raise TaylorMLPError(f"--coverage must be between 0 and 1, got {out.coverage}")
        if out.selection not in ("width", "error"):
            raise TaylorMLPError(f"selection must be 'width' or 'error', got {out.selection!r}")
        if out.error_budget <= 0:
            raise TaylorMLPError(f"error_budget must be positive, got {out.error_budget}")
        if not 1 <= out.max_pieces <= 64 or out.piece_tolerance <= 0:
            raise TaylorMLPError(f"max_pieces must be in 1..64 and piece_tolerance positive, got {out.max_pieces}, "
                                 f"{out.piece_tolerance}")
        if out.trust_tolerance < 0 or out.trust_max < 1.0:
            raise TaylorMLPError("trust_tolerance must be >= 0 and trust_max >= 1")
        if out.calibration_samples is not None and out.calibration_samples < 1:
            raise TaylorMLPError(f"--calibration-samples must be at least 1, got {out.calibration_samples}")
        if out.batch_size < 1 or out.batch_tokens < 1 or out.max_length < 2 or out.continuation_tokens < 1:
            raise TaylorMLPError("batch_size, batch_tokens and continuation_tokens must be positive and max_length >= 2")
        if not 0.0 <= out.margin <= 1.0:
            raise TaylorMLPError(f"margin must be between 0 and 1, got {out.margin}")
        return out


# ---------------------------------------------------------------- reading an MLP's weights


@dataclass
class MLPWeights:
    """CPU tensors: V [I, d] (gate), b [I] or None, U [I, d] or None (up), W [d, I] (down), c [d] or None; float64
    copies (an MLP in memory) or the source's own dtype (a streamed source: build_taylor_mlp takes float64 only of
    what the series arithmetic touches, the rest is copied straight into the release dtype)."""

    V: torch.Tensor
    b: torch.Tensor | None
    U: torch.Tensor | None
    W: torch.Tensor
    c: torch.Tensor | None


def weights_from_tensors(t: dict, arch: dict, layer_index: int, check: bool = True) -> MLPWeights:
    """MLPWeights from {"V", "b", "U", "W", "c"} tensors (see stream.SourceMLPs / stream.ModuleMLPs);
    check=True rejects NaN/Inf (done once per layer, when it is planned)."""
    if arch["family"] == "gated" and (t.get("b") is not None or t.get("c") is not None):
        raise TaylorMLPError("gated MLPs with biases (mlp_bias=True) are not supported yet")
    w = MLPWeights(V=t["V"], b=t.get("b"), U=t.get("U") if arch["up"] else None, W=t["W"], c=t.get("c"))
    for name in ("V", "b", "U", "W", "c") if check else ():
        tensor = getattr(w, name)
        if tensor is not None and not torch.isfinite(tensor).all():
            raise TaylorMLPError(f"layer {layer_index}: MLP weight {name} contains NaN or Inf; the model is corrupt")
    return w


def mlp_weights(mlp, arch: dict, layer_index: int) -> MLPWeights:
    """float64 MLPWeights of one MLP module held in memory."""
    from .stream import module_mlp_tensors

    return weights_from_tensors(module_mlp_tensors(mlp, arch), arch, layer_index)


# ---------------------------------------------------------------- one layer


@dataclass
class Pieces:
    """One layer's series pieces (activation coordinates a = z + b).  Piece q belongs to channel owner[q], is fitted
    on [lo[q], hi[q]] with coefficients coeffs[q] over t = (a - mid)/half, and is live for a in
    [edge_lo[q], edge_hi[q]); a channel's pieces partition the real line (its outer edges are ±inf)."""

    owner: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    coeffs: np.ndarray
    edge_lo: np.ndarray
    edge_hi: np.ndarray

    def select(self, channels: np.ndarray) -> "Pieces":
        keep = np.isin(self.owner, channels)
        return Pieces(self.owner[keep], self.lo[keep], self.hi[keep], self.coeffs[keep], self.edge_lo[keep],
                      self.edge_hi[keep])


def single_pieces(lo: np.ndarray, hi: np.ndarray, coeffs: np.ndarray) -> Pieces:
    n = len(lo)
    return Pieces(np.arange(n), lo, hi, coeffs, np.full(n, -np.inf), np.full(n, np.inf))


def build_taylor_mlp(w: MLPWeights, family: str, act: str, pieces: Pieces, protected: np.ndarray, signs: np.ndarray,
                     order: int, basis: str, dtype: torch.dtype) -> runtime.TaylorMLP:
    """A TaylorMLP for one layer; `protected` is a boolean mask over channels, pieces.coeffs [Q, N+1] over t."""
    sel = np.flatnonzero(protected)
    rest = np.flatnonzero(~protected)
    hidden = w.W.shape[0]
    P = len(sel)
    pc = pieces.select(sel)
    Q = len(pc.owner)
    with torch.device("meta"):  # every tensor is written below: skip the default initialisation
        module = runtime.TaylorMLP(family, hidden, P, len(rest), order, basis, act, rest_bias=w.b is not None,
                                   rest_out_bias=(w.c is not None and P == 0), pieces=Q)
    module = module.to_empty(device="cpu").to(dtype)  # float64 values are rounded once, straight into dtype
    sel_t, rest_t = torch.from_numpy(sel), torch.from_numpy(rest)
    with torch.no_grad():
        if P:
            slot = np.searchsorted(sel, pc.owner)  # piece -> released channel index
            s_ch = torch.from_numpy(signs[sel]).double()  # ±1 per channel
            s = s_ch[torch.from_numpy(slot)]  # ±1 per piece
            b = w.b[torch.from_numpy(pc.owner)].double() if w.b is not None else torch.zeros(Q, dtype=torch.float64)
            mid = torch.from_numpy((pc.lo + pc.hi) / 2.0)
            h = torch.from_numpy((pc.hi - pc.lo) / 2.0)
            module.gate.weight.copy_(s_ch[:, None] * w.V[sel_t].double())
            if module.up is not None:
                module.up.weight.copy_(w.U[sel_t])
            module.z0.copy_(s * (mid - b))  # public coordinate z = V x
            module.h.copy_(h)
            if Q > P:
                edge_lo = torch.from_numpy(pc.edge_lo) - b  # still ±inf at the outer edges
                edge_hi = torch.from_numpy(pc.edge_hi) - b
                flip = s < 0  # z -> -z maps [lo, hi) onto [-hi, -lo): still a partition of the line
                module.owner.copy_(torch.from_numpy(slot))
                module.edge_lo.copy_(torch.where(flip, -edge_hi, edge_lo))
                module.edge_hi.copy_(torch.where(flip, -edge_lo, edge_hi))
            c = torch.from_numpy(pc.coeffs)  # [Q, N+1]
            s_pow = s[:, None] ** torch.arange(order + 1, dtype=torch.float64)  # s_jⁿ
            W_sel = w.W[:, torch.from_numpy(pc.owner)].double()  # [d, Q] float64
            for n in range(order + 1):  # one order at a time: a [d, Q] float64 block, never all N+1 at once
                theta_n = W_sel * (c[:, n] * s_pow[:, n])[None, :]  # Θ_n[:, q] = W_{·,j(q)} c_{q,n} s_jⁿ
                if n == 0 and w.c is not None:
                    theta_n += w.c[:, None].double() / P  # output bias folded into the order-0 term (one live piece each)
                module.theta[:, n * Q:(n + 1) * Q].copy_(theta_n)
        if module.rest is not None:
            module.rest.gate.weight.copy_(w.V[rest_t])
            if w.b is not None:
                module.rest.gate.bias.copy_(w.b[rest_t])
            if module.rest.up is not None:
                module.rest.up.weight.copy_(w.U[rest_t])
            module.rest.down.weight.copy_(w.W[:, rest_t])
            if module.rest.down.bias is not None:
                module.rest.down.bias.copy_(w.c)
    return module


def split_pieces(basis: str, act: str, lo: np.ndarray, hi: np.ndarray, order: int, tolerance: float,
                 max_pieces: int, split_order: int | None = None) -> tuple[Pieces, np.ndarray]:
    """Bisect each channel's interval where the degree-`split_order` (default: N) series misses the activation by
    more than `tolerance`, worst piece first, up to max_pieces per channel; then fit degree N on every piece.
    Returns the pieces and each piece's in-interval error at degree N."""
    final_order, order = order, (split_order or order)
    key = (basis, act, hashlib.sha1(lo.tobytes() + hi.tobytes()).hexdigest(), order, tolerance, max_pieces)
    if key in _SPLITS:  # the same split at another final order (--slowdown tries several N on fixed pieces)
        owner, plo, phi = _SPLITS[key]
        coeffs = series.series_coefficients(basis, act, plo, phi, final_order)
        err = approximation_error(basis, act, plo, phi, coeffs)
        return _ordered_pieces(owner, plo.copy(), phi.copy(), coeffs, err)
    owner = np.arange(len(lo))
    plo, phi = lo.copy(), hi.copy()
    coeffs = series.series_coefficients(basis, act, plo, phi, order)
    err = approximation_error(basis, act, plo, phi, coeffs)
    for _ in range(max_pieces - 1):
        counts = np.bincount(owner, minlength=len(lo))
        cand = np.flatnonzero((err > tolerance) & (counts[owner] < max_pieces))
        if cand.size == 0:
            break
        cand = cand[np.lexsort((-err[cand], owner[cand]))]  # by channel, worst first
        worst = cand[np.r_[True, owner[cand][1:] != owner[cand][:-1]]]  # one split per channel per round
        m = (plo[worst] + phi[worst]) / 2.0
        new_lo, new_hi = m, phi[worst].copy()
        phi[worst] = m
        owner = np.concatenate([owner, owner[worst]])
        plo, phi = np.concatenate([plo, new_lo]), np.concatenate([phi, new_hi])
        changed = np.concatenate([worst, np.arange(len(owner) - len(worst), len(owner))])
        coeffs = np.concatenate([coeffs, np.zeros((len(worst), order + 1))])
        err = np.concatenate([err, np.zeros(len(worst))])
        coeffs[changed] = series.series_coefficients(basis, act, plo[changed], phi[changed], order)
        err[changed] = approximation_error(basis, act, plo[changed], phi[changed], coeffs[changed])
    if order != final_order:
        coeffs = series.series_coefficients(basis, act, plo, phi, final_order)
        err = approximation_error(basis, act, plo, phi, coeffs)
    if split_order is not None:
        _SPLITS[key] = (owner, plo.copy(), phi.copy())
        while len(_SPLITS) > _SPLITS_KEPT:
            _SPLITS.pop(next(iter(_SPLITS)))
    return _ordered_pieces(owner, plo, phi, coeffs, err)


_SPLITS: dict = {}  # split_pieces' bisections decided at a fixed split_order, most recent last
_SPLITS_KEPT = 128  # layers' worth (a few KB to a few MB each); throttle.protect_for_slowdown clears it when done


def forget_splits() -> None:
    """Drop split_pieces' remembered bisections (the slowdown search is done with them)."""
    _SPLITS.clear()


def _ordered_pieces(owner, plo, phi, coeffs, err) -> tuple[Pieces, np.ndarray]:
    """Pieces sorted by channel then position, each channel's outer edges open to ±inf."""
    perm = np.lexsort((plo, owner))
    owner, plo, phi, coeffs, err = owner[perm], plo[perm], phi[perm], coeffs[perm], err[perm]
    first = np.r_[True, owner[1:] != owner[:-1]]
    last = np.r_[owner[1:] != owner[:-1], True]
    edge_lo = np.where(first, -np.inf, plo)
    edge_hi = np.where(last, np.inf, phi)
    return Pieces(owner, plo, phi, coeffs, edge_lo, edge_hi), err


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
    if texts is None:
        texts = stdlib_prose(opts.prose_chars)
        prose_name = "python-stdlib-docstrings"
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
    with RangeRecorder(model, _eos_ids(tokenizer, model)) as recorder:
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
    ranges.sources = sources
    return CalibrationData(chunks, valid, sources), ranges


def logit_margin(seq: dict) -> float:
    """The smallest gap between the original's top two logits over a validation continuation: how far its greedy
    choice is from flipping.  Candidates fail first on the sequences with the smallest margin."""
    top2 = seq["logits"].topk(2, dim=-1).values if seq["logits"].shape[-1] > 1 else None
    return float((top2[:, 0] - top2[:, 1]).min()) if top2 is not None and len(top2) else math.inf


@torch.no_grad()
def continuation_logits(model, seqs: list[dict], max_tokens: int = 4096, sort: bool = True,
                        first_tokens: int | None = None):
    """Yields (k, logits) for every sequence k, batch by batch (not in list order): the logits at the positions
    that predict its continuation, [K, V] float32.

    Sequences run in length-sorted, left-padded batches with explicit position ids (padding changes nothing);
    the vocabulary projection runs only on the last positions.  Stop iterating to skip the remaining batches."""
    device = _input_device(model)
    for idx, ids, mask in padded_batches([s["ids"] for s in seqs], max_tokens, side="left", sort=sort,
                                         first_tokens=first_tokens):
        keep = max(len(seqs[k]["ids"]) - seqs[k]["prompt_len"] + 1 for k in idx)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device),
                    use_cache=False, logits_to_keep=keep).logits.float().cpu()
        for row, k in enumerate(idx):
            K = len(seqs[k]["ids"]) - seqs[k]["prompt_len"]
            yield k, out[row, keep - K - 1:-1].clone()
        del out


@torch.no_grad()
def validate(model, validation: list[dict], max_tokens: int = 4096, budget: float | None = None,
             limit: int | None = None) -> dict:
    """Teacher-forced check on the original's greedy continuations: all argmaxes equal ⇔ identical greedy text.
    With a `budget`, walk the sequences in list order in small batches and stop at the first batch that proves
    failure (a token differs or an error exceeds it); the failing sequence moves to the front of `validation`,
    where the next, similar candidate is likely to fail too.  `limit` checks only the first `limit` sequences
    (the screen of largest_accepted)."""
    matched = total = seqs_exact = seen = 0
    max_err = 0.0
    failed = False
    early = budget is not None
    seqs = validation if limit is None else validation[:limit]
    for k, logits in continuation_logits(model, seqs, max_tokens, sort=not early,
                                         first_tokens=max_tokens // 16 if early else None):
        seq = validation[k]
        same = logits.argmax(-1) == seq["logits"].argmax(-1)
        matched += int(same.sum())
        total += same.numel()
        seqs_exact += int(bool(same.all()))
        seen += 1
        max_err = max(max_err, float((logits - seq["logits"]).abs().max()))
        if early and (not bool(same.all()) or max_err > budget):
            failed = True
            validation.insert(0, validation.pop(k))
            break
    result = {"tokens_matched": matched, "tokens": total, "sequences_exact": seqs_exact,
              "sequences": len(seqs), "max_logit_error": max_err, "exact": matched == total and not failed}
    if failed:
        result["stopped_after"] = seen
    return result


# ---------------------------------------------------------------- the whole model


@dataclass
class LayerPlan:
    """What protect decided for one layer, small enough to keep for every layer: its series pieces, the channel
    scores that rank it for coverage, the ±1 signs and the facts the release spec needs."""

    pieces: Pieces
    score: np.ndarray
    signs: np.ndarray
    hidden: int
    has_b: bool
    has_c: bool


class CandidateMLP(torch.nn.Module):
    """Stands in for a layer's MLP while a coverage is tried: builds that layer's TaylorMLP for `mask` from the
    weight reader when called.  It registers no tensors, so a streamed layer onloads nothing for it; with
    keep=False (streamed models) the built module is dropped after every call, so nothing per layer stays."""

    def __init__(self, protector: "Protector", index: int, mask: np.ndarray, keep: bool):
        super().__init__()
        self.index, self.keep = index, keep
        object.__setattr__(self, "_protector", protector)  # not a child module
        object.__setattr__(self, "_mask", mask)
        object.__setattr__(self, "_built", None)

    def build(self) -> runtime.TaylorMLP:
        if self._built is not None:
            return self._built
        module = self._protector.build(self.index, self._mask)
        if self.keep:
            object.__setattr__(self, "_built", module)
        return module

    def forward(self, x):
        module = self.build().to(x.device)
        y = module(x)
        del module  # freed here (reference counting); the heap is trimmed once per validation, not per layer
        return y


class Protector:
    """Plans every layer once (series pieces, channel ranking, signs) reading one layer's MLP weights at a time,
    then builds any coverage: `apply` for validation passes, `build` for the release writer."""

    def __init__(self, model, ranges: Ranges, opts: ProtectOptions, mlps=None, streamed: bool = False):
        from .stream import ModuleMLPs

        self.model, self.opts, self.streamed = model, opts, streamed
        self.arch = runtime.architecture(model.config)
        self.act = runtime.activation_name(model.config)
        try:
            series.canonical_activation(self.act)
        except ValueError as exc:
            raise TaylorMLPError(str(exc)) from exc
        self.layers = runtime.decoder_layers(model)
        self.originals = [layer.mlp for layer in self.layers]
        self.mlps = mlps if mlps is not None else ModuleMLPs(model)
        self.dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
        rng = np.random.default_rng(opts.seed)
        self.plans: list[LayerPlan] = []
        for i in bar(range(len(self.layers)), desc="series coefficients", unit="layer"):
            self.plans.append(self._plan(i, self.weights(i, check=True), ranges.lo[i], ranges.hi[i], rng))
        flat = np.concatenate([p.score for p in self.plans])
        self.order_index = np.argsort(flat, kind="stable")  # easiest channels first
        self.sizes = [len(p.score) for p in self.plans]
        self.total = int(flat.size)

    @property
    def pieces(self) -> list[Pieces]:
        return [p.pieces for p in self.plans]

    @property
    def signs(self) -> list[np.ndarray]:
        return [p.signs for p in self.plans]

    def weights(self, i: int, check: bool = False) -> MLPWeights:
        return weights_from_tensors(self.mlps.tensors(i), self.arch, i, check)

    def _plan(self, i: int, w: MLPWeights, lo: np.ndarray, hi: np.ndarray, rng) -> LayerPlan:
        opts = self.opts
        width = np.maximum(hi - lo, 1e-3)
        mid = (lo + hi) / 2.0
        lo, hi = mid - width * (0.5 + opts.margin), mid + width * (0.5 + opts.margin)
        pieces, piece_error = split_pieces(opts.basis, self.act, lo, hi, opts.order, opts.piece_tolerance,
                                           opts.max_pieces, opts.piece_order)
        error_in = np.zeros(len(lo))
        np.maximum.at(error_in, pieces.owner, piece_error)
        signs = rng.choice(np.array([-1.0, 1.0]), size=len(lo))
        if opts.selection == "width":
            score = hi - lo
        else:  # worst approximation error on the interval, weighted by the channel's output norm
            score = error_in * w.W.double().norm(dim=0).numpy()
        # a one-piece channel's polynomial is trusted (before the runtime's clamp) as far as it stays accurate
        single = np.bincount(pieces.owner, minlength=len(lo))[pieces.owner] == 1
        if opts.trust_tolerance > 0 and single.any():
            q = np.flatnonzero(single)
            r = series.trust_radius(opts.basis, self.act, pieces.lo[q], pieces.hi[q], pieces.coeffs[q],
                                    np.maximum(piece_error[q], opts.trust_tolerance), opts.trust_max)
            pieces.coeffs[q] = series.rescale_coefficients(opts.basis, pieces.coeffs[q], r)
            pmid, half = (pieces.lo[q] + pieces.hi[q]) / 2.0, (pieces.hi[q] - pieces.lo[q]) / 2.0 * r
            pieces.lo[q], pieces.hi[q] = pmid - half, pmid + half
        return LayerPlan(pieces, score, signs, int(w.W.shape[0]), w.b is not None, w.c is not None)

    def layer_work(self, coverage: float) -> tuple[np.ndarray, np.ndarray]:
        """Per layer, for `coverage`: (Θ values, extra multiply-adds per token over the original MLP).  A protected
        channel j with q_j pieces holds d·(N+1)·q_j values of Θ and adds d·((N+1)·q_j − 1) MACs (throttle.py)."""
        values, extra = [], []
        for plan, mask in zip(self.plans, self.masks(coverage)):
            q = np.bincount(plan.pieces.owner, minlength=len(plan.score))[mask]
            values.append(plan.hidden * (self.opts.order + 1) * int(q.sum()))
            extra.append(plan.hidden * int(((self.opts.order + 1) * q - 1).sum()))
        return np.array(values, dtype=np.int64), np.array(extra, dtype=np.int64)

    def masks(self, coverage: float) -> list[np.ndarray]:
        k = int(round(coverage * self.total))
        chosen = np.zeros(self.total, dtype=bool)
        chosen[self.order_index[:k]] = True
        return np.split(chosen, np.cumsum(self.sizes)[:-1])

    def build(self, i: int, mask: np.ndarray) -> runtime.TaylorMLP:
        plan = self.plans[i]
        return build_taylor_mlp(self.weights(i), self.arch["family"], self.act, plan.pieces, mask, plan.signs,
                                self.opts.order, self.opts.basis, self.dtype)

    def apply(self, coverage: float, materialize: bool | None = None, only=None) -> list[np.ndarray]:
        """Install `coverage`'s MLPs: real TaylorMLP modules (materialize=True, the default for a model in memory),
        or candidates that build each layer's module when it runs and drop it after (the default when streamed).
        `only`: the layer indices to install (the others keep their original MLP); default all."""
        materialize = not self.streamed if materialize is None else materialize
        masks = self.masks(coverage)
        for i, (layer, mask) in enumerate(zip(self.layers, masks)):
            device = _module_device(self.originals[i])
            if only is not None and i not in only:
                layer.mlp = self.originals[i]
            elif materialize:
                layer.mlp = self.build(i, mask).to(device)
            else:
                layer.mlp = CandidateMLP(self, i, mask, keep=False)
        return masks

    def restore(self) -> None:
        for layer, mlp in zip(self.layers, self.originals):
            layer.mlp = mlp


def _module_device(module) -> torch.device:
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def approximation_error(basis: str, act: str, lo: np.ndarray, hi: np.ndarray, coeffs: np.ndarray,
                        points: int = 65) -> np.ndarray:
    """max over a grid of |series(t) - act(a)| on each channel's interval (float64)."""
    t = np.cos(np.linspace(0.0, math.pi, points))
    return series.series_error(basis, act, lo, hi, coeffs, t).max(-1)


def build_spec(protector: Protector, masks: list[np.ndarray], opts: ProtectOptions, extra: dict) -> dict:
    layers = []
    for plan, mask in zip(protector.plans, masks):
        P = int(mask.sum())
        Q = int(np.isin(plan.pieces.owner, np.flatnonzero(mask)).sum())
        layers.append({"protected": P, "pieces": Q, "rest": int(mask.size - P),
                       "rest_out_bias": bool(plan.has_c and P == 0)})
    total = sum(m.size for m in masks)
    return {
        "format_version": runtime.FORMAT_VERSION,
        "family": protector.arch["family"],
        "hidden_size": int(protector.plans[0].hidden),
        "activation": protector.act,
        "order": int(opts.order),
        "basis": opts.basis,
        "preset": opts.preset,
        "selection": opts.selection,
        "margin": float(opts.margin),
        "max_pieces": int(opts.max_pieces),
        "rest_bias": bool(protector.plans[0].has_b),
        "coverage": float(sum(int(m.sum()) for m in masks) / total),
        "layers": layers,
        **extra,
    }


def protect(model, tokenizer=None, calibration: list[str] | Ranges | None = None, options: ProtectOptions | None = None,
            chat: bool | None = None, prepared: tuple[CalibrationData, Ranges] | None = None, **kwargs) -> dict:
    """Replace every MLP of `model` by a TaylorMLP in place and return the release spec (also set on
    ``model.config.taylormlp``).  `calibration` is a list of texts (default: the built-in corpus) or ready
    Ranges (then no validation is possible and `coverage` must be given); `prepared` reuses `calibrate()`."""
    opts = (options or ProtectOptions(**kwargs)).resolved()
    try:
        runtime.architecture(model.config)
    except ValueError as exc:
        raise TaylorMLPError(str(exc)) from exc
    model.eval()
    data, ranges = _calibration(model, tokenizer, calibration, opts, chat, prepared)
    protector = Protector(model, ranges, opts)
    return finish(protector, choose_coverage(protector, data), data, ranges)


def _calibration(model, tokenizer, calibration, opts, chat, prepared):
    if prepared is not None:
        return prepared
    if isinstance(calibration, Ranges):
        if opts.coverage is None:
            raise TaylorMLPError("with precomputed ranges there is no validation data: give coverage explicitly")
        return None, calibration
    return calibrate(model, tokenizer, calibration, opts, chat)


def choose_coverage(protector: "Protector", data: CalibrationData | None) -> tuple[float, list]:
    search: list = []
    opts = protector.opts
    coverage = opts.coverage if opts.coverage is not None else search_coverage(protector, data, search)
    return coverage, search


def finish(protector: "Protector", chosen: tuple[float, list] | float, data: CalibrationData | None, ranges: Ranges,
           search: list | None = None, materialize: bool | None = None) -> dict:
    """Install `coverage`'s MLPs, validate (or reuse the search's run of this very coverage), and record the spec on
    the model config.  materialize=False leaves candidates installed (streamed models: the writer builds them)."""
    coverage, search = chosen if isinstance(chosen, tuple) else (chosen, search or [])
    opts, model = protector.opts, protector.model
    masks = protector.apply(coverage, materialize=materialize)
    extra = {"calibration": ranges.summary(), "seed": opts.seed}
    if data is not None and data.validation:
        done = [row for row in search if row["coverage"] == coverage and "stopped_after" not in row
                and not row.get("screen")]
        if done:
            extra["validation"] = {k: v for k, v in done[-1].items() if k not in ("coverage", "accepted", "screen")}
        else:
            extra["validation"] = validate(model, data.validation, opts.batch_tokens)
    extra["coverage_search"] = search
    spec = build_spec(protector, masks, opts, extra)
    model.config.taylormlp = spec
    return spec


SCREEN = 0.25  # share of the validation tokens a candidate must pass before the whole set is run (the screen)


def largest_accepted(check, cap: float, steps: int, floor: float = 0.0) -> float:
    """Largest coverage on the grid floor + k·(cap − floor)/2^steps (k = 0..2^steps; floor counts as accepted) that
    `check(coverage, screen=False)` accepts, acceptance assumed to fall as coverage grows: a bisection.

    Screened, because a full validation costs ~4x a screen: `check(coverage, screen=True)` runs only the first few
    validation sequences (a necessary condition), and the bisection runs on screens alone; only its answer is
    validated in full.  If that fails, the failing sequence joins the screen (check's job: validate moves it to the
    front, the screen grows by one) and the bisection resumes below it.  When acceptance does fall monotonically, the
    answer is the one plain bisection with full checks gives (tests/test_search.py), at one full validation plus
    cheap screens in the usual case; either way the answer itself has passed a full validation."""
    n = 2 ** steps

    def at(k: int) -> float:
        return cap if k == n else floor + (cap - floor) * k / n

    good, bad = 0, n + 1  # good: accepted in full; bad: rejected (n + 1: nothing tried yet)
    while bad - good > 1:
        a, b = good, bad
        if b == n + 1:  # the cap itself first: the whole model often passes (default preset)
            if check(at(n), screen=True):
                a = n
            b = n
        while b - a > 1:
            m = (a + b) // 2
            a, b = (m, b) if check(at(m), screen=True) else (a, m)
        if a == good:
            break
        if check(at(a), screen=False):
            good = a
            break  # everything above failed a screen, a necessary condition
        bad = a
    return at(good)


def search_coverage(protector: Protector, data: CalibrationData, trace: list) -> float:
    """Largest coverage (bisection on the channel ranking) whose validation is token-exact with every logit
    within the error budget (largest_accepted: screened bisection, one full validation of the answer)."""
    if data is None or not data.validation:
        raise TaylorMLPError("no validation prompts: cannot choose coverage automatically; pass --coverage")
    opts = protector.opts
    steps = bar(desc="coverage search", unit="check")
    check = screened_check(protector.model, data.validation, opts.batch_tokens, opts.error_budget,
                           protector.apply, trace, steps)
    good = largest_accepted(check, 1.0, opts.search_steps)
    steps.close()
    protector.restore()
    log(f"coverage search: largest accepted coverage {good:.3f} (token-exact, max logit error <= {opts.error_budget})")
    return good


def screened_check(model, validation: list[dict], max_tokens: int, budget: float, install, trace: list,
                   progress=None, extra: dict | None = None):
    """check(coverage, screen) for largest_accepted: `install(coverage)` puts the candidate in the model, then a
    validation within `budget` on the screen or the whole set.  The screen is the first sequences of `validation`
    (most fragile first, see logit_margin) holding a SCREEN share of its tokens; a full check that fails adds its
    failing sequence (moved to the front by validate) to the screen.  Every check is a row of `trace`."""
    lengths = np.cumsum([len(seq["ids"]) for seq in validation])
    size = [int(np.searchsorted(lengths, SCREEN * lengths[-1])) + 1 if len(lengths) else 0]

    def check(coverage: float, screen: bool = False) -> bool:
        install(coverage)
        result = validate(model, validation, max_tokens, budget=budget, limit=size[0] if screen else None)
        release_memory()
        ok = bool(result["exact"] and result["max_logit_error"] <= budget)
        if not ok and not screen:
            size[0] = min(size[0] + 1, len(validation))
        trace.append({**(extra or {}), "coverage": coverage, "accepted": ok, "screen": screen, **result})
        if progress is not None:
            progress.update()
            progress.set_postfix(coverage=f"{coverage:.3f}", check="screen" if screen else "full", ok=ok)
        return ok

    return check
