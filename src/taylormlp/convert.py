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

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from . import runtime, series
from .calibration import Ranges, calibration_prompts, collect_ranges, format_prompt, greedy_sequences, stdlib_prose, \
    tokenize_chunks
from .errors import TaylorMLPError
from .progress import bar, log

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
    prose_chars: int = 60_000
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
        if not 0.0 <= out.margin <= 1.0:
            raise TaylorMLPError(f"margin must be between 0 and 1, got {out.margin}")
        return out


# ---------------------------------------------------------------- reading an MLP's weights


@dataclass
class MLPWeights:
    """float64 copies: V [I, d] (gate), b [I] or None, U [I, d] or None (up), W [d, I] (down), c [d] or None."""

    V: torch.Tensor
    b: torch.Tensor | None
    U: torch.Tensor | None
    W: torch.Tensor
    c: torch.Tensor | None


def mlp_weights(mlp, arch: dict, layer_index: int) -> MLPWeights:
    gate, down = getattr(mlp, arch["gate"]), getattr(mlp, arch["down"])
    up = getattr(mlp, arch["up"]) if arch["up"] else None
    if arch["family"] == "gated" and (gate.bias is not None or down.bias is not None):
        raise TaylorMLPError("gated MLPs with biases (mlp_bias=True) are not supported yet")
    w = MLPWeights(
        V=runtime.linear_weight(gate).detach().double(),
        b=gate.bias.detach().double() if gate.bias is not None else None,
        U=runtime.linear_weight(up).detach().double() if up is not None else None,
        W=runtime.linear_weight(down).detach().double(),
        c=down.bias.detach().double() if down.bias is not None else None,
    )
    for name, tensor in asdict(w).items():
        if tensor is not None and not torch.isfinite(tensor).all():
            raise TaylorMLPError(f"layer {layer_index}: MLP weight {name} contains NaN or Inf; the model is corrupt")
    return w


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
    module = runtime.TaylorMLP(family, hidden, P, len(rest), order, basis, act, rest_bias=w.b is not None,
                               rest_out_bias=(w.c is not None and P == 0), pieces=Q)
    sel_t, rest_t = torch.from_numpy(sel), torch.from_numpy(rest)
    with torch.no_grad():
        if P:
            slot = np.searchsorted(sel, pc.owner)  # piece -> released channel index
            s_ch = torch.from_numpy(signs[sel]).double()  # ±1 per channel
            s = s_ch[torch.from_numpy(slot)]  # ±1 per piece
            b = w.b[torch.from_numpy(pc.owner)] if w.b is not None else torch.zeros(Q, dtype=torch.float64)
            mid = torch.from_numpy((pc.lo + pc.hi) / 2.0)
            h = torch.from_numpy((pc.hi - pc.lo) / 2.0)
            module.gate.weight.copy_(s_ch[:, None] * w.V[sel_t])
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
            W_sel = w.W[:, torch.from_numpy(pc.owner)]  # [d, Q]
            theta = W_sel[:, None, :] * (c * s_pow).T[None, :, :]  # Θ[d, n, q] = W_{·,j(q)} c_{q,n} s_jⁿ
            if w.c is not None:
                theta[:, 0, :] += w.c[:, None] / P  # output bias folded into the order-0 term (one live piece each)
            module.theta.copy_(theta.reshape(hidden, (order + 1) * Q))
        if module.rest is not None:
            module.rest.gate.weight.copy_(w.V[rest_t])
            if w.b is not None:
                module.rest.gate.bias.copy_(w.b[rest_t])
            if module.rest.up is not None:
                module.rest.up.weight.copy_(w.U[rest_t])
            module.rest.down.weight.copy_(w.W[:, rest_t])
            if module.rest.down.bias is not None:
                module.rest.down.bias.copy_(w.c)
    return module.to(dtype)


def split_pieces(basis: str, act: str, lo: np.ndarray, hi: np.ndarray, order: int, tolerance: float,
                 max_pieces: int, split_order: int | None = None) -> tuple[Pieces, np.ndarray]:
    """Bisect each channel's interval where the degree-`split_order` (default: N) series misses the activation by
    more than `tolerance`, worst piece first, up to max_pieces per channel; then fit degree N on every piece.
    Returns the pieces and each piece's in-interval error at degree N."""
    owner = np.arange(len(lo))
    plo, phi = lo.copy(), hi.copy()
    final_order, order = order, (split_order or order)
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
    calibration: list[torch.Tensor]
    validation: list[dict]  # {"ids", "prompt_len", "logits"}: the original's logits on the continuation
    sources: dict = field(default_factory=dict)


@torch.no_grad()
def prepare_calibration(model, tokenizer, texts: list[str] | None, opts: ProtectOptions, chat: bool,
                        validation_every: int = 5) -> CalibrationData:
    """Prose chunks plus prompts with the model's own greedy continuations; every k-th prompt is validation."""
    if texts is None:
        texts = stdlib_prose(opts.prose_chars)
        prose_name = "python-stdlib-docstrings"
    else:
        prose_name = "user-corpus"
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise TaylorMLPError("the calibration text is empty; give a file with real text (--calibration FILE)")
    chunks = tokenize_chunks(tokenizer, texts, opts.max_length)
    if not chunks:
        raise TaylorMLPError("the calibration text is too short: it tokenizes to fewer than 2 tokens")
    prompts = calibration_prompts()
    formatted = [format_prompt(tokenizer, p, True) for p in prompts["chat"]] if chat else []
    formatted += prompts["raw"]
    seqs = greedy_sequences(model, tokenizer, formatted, opts.continuation_tokens, desc="original continuations")
    calib, valid = list(chunks), []
    for i, seq in enumerate(seqs):
        if i % validation_every == validation_every - 1:
            valid.append(seq)
        else:
            calib.append(seq["ids"])
    for seq in valid:
        seq["logits"] = continuation_logits(model, seq)
    sources = {prose_name: len(chunks), "prompts+continuations": len(seqs) - len(valid), "validation": len(valid)}
    return CalibrationData(calib, valid, sources)


@torch.no_grad()
def continuation_logits(model, seq: dict) -> torch.Tensor:
    """Logits at the positions that predict the continuation (the vocabulary projection runs only there)."""
    ids = seq["ids"].reshape(1, -1)
    keep = ids.shape[1] - seq["prompt_len"] + 1
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, logits_to_keep=keep).logits[0]
    return logits[:-1].float()


@torch.no_grad()
def validate(model, validation: list[dict]) -> dict:
    """Teacher-forced check on the original's greedy continuations: all argmaxes equal ⇔ identical greedy text."""
    matched = total = seqs_exact = 0
    max_err = 0.0
    for seq in validation:
        logits = continuation_logits(model, seq)
        same = logits.argmax(-1) == seq["logits"].argmax(-1)
        matched += int(same.sum())
        total += same.numel()
        seqs_exact += int(bool(same.all()))
        max_err = max(max_err, float((logits - seq["logits"]).abs().max()))
    return {"tokens_matched": matched, "tokens": total, "sequences_exact": seqs_exact,
            "sequences": len(validation), "max_logit_error": max_err, "exact": matched == total}


# ---------------------------------------------------------------- the whole model


class Protector:
    """Holds the original MLPs, the candidate coefficients and the channel ranking; builds any coverage."""

    def __init__(self, model, ranges: Ranges, opts: ProtectOptions):
        self.model, self.opts = model, opts
        self.arch = runtime.architecture(model.config)
        self.act = runtime.activation_name(model.config)
        try:
            series.canonical_activation(self.act)
        except ValueError as exc:
            raise TaylorMLPError(str(exc)) from exc
        self.layers = runtime.decoder_layers(model)
        self.originals = [layer.mlp for layer in self.layers]
        self.dtype = next(model.parameters()).dtype
        self.weights = [mlp_weights(m, self.arch, i) for i, m in enumerate(self.originals)]
        rng = np.random.default_rng(opts.seed)
        self.pieces, self.scores, self.signs = [], [], []
        for i, w in enumerate(bar(self.weights, desc="series coefficients", unit="layer")):
            lo, hi = ranges.lo[i], ranges.hi[i]
            width = np.maximum(hi - lo, 1e-3)
            mid = (lo + hi) / 2.0
            lo, hi = mid - width * (0.5 + opts.margin), mid + width * (0.5 + opts.margin)
            pieces, piece_error = split_pieces(opts.basis, self.act, lo, hi, opts.order, opts.piece_tolerance,
                                               opts.max_pieces, opts.piece_order)
            error_in = np.zeros(len(lo))
            np.maximum.at(error_in, pieces.owner, piece_error)
            self.signs.append(rng.choice(np.array([-1.0, 1.0]), size=len(lo)))
            if opts.selection == "width":
                self.scores.append(hi - lo)
            else:  # worst approximation error on the interval, weighted by the channel's output norm
                self.scores.append(error_in * w.W.norm(dim=0).numpy())
            # a one-piece channel's polynomial is trusted (before the runtime's clamp) as far as it stays accurate
            single = np.bincount(pieces.owner, minlength=len(lo))[pieces.owner] == 1
            if opts.trust_tolerance > 0 and single.any():
                q = np.flatnonzero(single)
                r = series.trust_radius(opts.basis, self.act, pieces.lo[q], pieces.hi[q], pieces.coeffs[q],
                                        np.maximum(piece_error[q], opts.trust_tolerance), opts.trust_max)
                pieces.coeffs[q] = series.rescale_coefficients(opts.basis, pieces.coeffs[q], r)
                pmid, half = (pieces.lo[q] + pieces.hi[q]) / 2.0, (pieces.hi[q] - pieces.lo[q]) / 2.0 * r
                pieces.lo[q], pieces.hi[q] = pmid - half, pmid + half
            self.pieces.append(pieces)
        flat = np.concatenate(self.scores)
        self.order_index = np.argsort(flat, kind="stable")  # easiest channels first
        self.sizes = [len(s) for s in self.scores]
        self.total = int(flat.size)

    def masks(self, coverage: float) -> list[np.ndarray]:
        k = int(round(coverage * self.total))
        chosen = np.zeros(self.total, dtype=bool)
        chosen[self.order_index[:k]] = True
        return np.split(chosen, np.cumsum(self.sizes)[:-1])

    def apply(self, coverage: float) -> list[np.ndarray]:
        masks = self.masks(coverage)
        family = self.arch["family"]
        for i, (layer, mask) in enumerate(zip(self.layers, masks)):
            layer.mlp = build_taylor_mlp(self.weights[i], family, self.act, self.pieces[i], mask, self.signs[i],
                                         self.opts.order, self.opts.basis, self.dtype)
        return masks

    def restore(self) -> None:
        for layer, mlp in zip(self.layers, self.originals):
            layer.mlp = mlp


def approximation_error(basis: str, act: str, lo: np.ndarray, hi: np.ndarray, coeffs: np.ndarray,
                        points: int = 65) -> np.ndarray:
    """max over a grid of |series(t) - act(a)| on each channel's interval (float64)."""
    t = np.cos(np.linspace(0.0, math.pi, points))
    return series.series_error(basis, act, lo, hi, coeffs, t).max(-1)


def build_spec(model, protector: Protector, masks: list[np.ndarray], opts: ProtectOptions, extra: dict) -> dict:
    layers = []
    for w, mask, pieces in zip(protector.weights, masks, protector.pieces):
        P = int(mask.sum())
        Q = int(np.isin(pieces.owner, np.flatnonzero(mask)).sum())
        layers.append({"protected": P, "pieces": Q, "rest": int(mask.size - P),
                       "rest_out_bias": bool(w.c is not None and P == 0)})
    total = sum(m.size for m in masks)
    return {
        "format_version": runtime.FORMAT_VERSION,
        "family": protector.arch["family"],
        "hidden_size": int(protector.weights[0].W.shape[0]),
        "activation": protector.act,
        "order": int(opts.order),
        "basis": opts.basis,
        "preset": opts.preset,
        "selection": opts.selection,
        "margin": float(opts.margin),
        "max_pieces": int(opts.max_pieces),
        "rest_bias": protector.weights[0].b is not None,
        "coverage": float(sum(int(m.sum()) for m in masks) / total),
        "layers": layers,
        **extra,
    }


def calibrate(model, tokenizer, texts: list[str] | None, opts: ProtectOptions,
              chat: bool | None = None) -> tuple[CalibrationData, Ranges]:
    """Calibration sequences, validation sequences and the per-channel ranges they produce."""
    if tokenizer is None:
        raise TaylorMLPError("protect() needs the tokenizer to calibrate on text")
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    data = prepare_calibration(model, tokenizer, texts, opts, chat)
    ranges = collect_ranges(model, data.calibration)
    ranges.sources = data.sources
    return data, ranges


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
    if prepared is not None:
        data, ranges = prepared
    elif isinstance(calibration, Ranges):
        if opts.coverage is None:
            raise TaylorMLPError("with precomputed ranges there is no validation data: give coverage explicitly")
        data, ranges = None, calibration
    else:
        data, ranges = calibrate(model, tokenizer, calibration, opts, chat)
    protector = Protector(model, ranges, opts)
    search = []
    coverage = opts.coverage if opts.coverage is not None else search_coverage(protector, data, search)
    return finish(protector, coverage, data, ranges, search)


def finish(protector: "Protector", coverage: float, data: CalibrationData | None, ranges: Ranges,
           search: list | None = None) -> dict:
    """Install the TaylorMLPs for `coverage`, validate, and record the spec on the model config."""
    opts, model = protector.opts, protector.model
    masks = protector.apply(coverage)
    extra = {"calibration": ranges.summary(), "seed": opts.seed}
    if data is not None and data.validation:
        extra["validation"] = validate(model, data.validation)
    extra["coverage_search"] = search or []
    spec = build_spec(model, protector, masks, opts, extra)
    model.config.taylormlp = spec
    return spec


def search_coverage(protector: Protector, data: CalibrationData, trace: list) -> float:
    """Largest coverage (bisection on the channel ranking) whose validation is token-exact with every logit
    within the error budget."""
    if not data.validation:
        raise TaylorMLPError("no validation prompts: cannot choose coverage automatically; pass --coverage")
    budget = protector.opts.error_budget

    def acceptable(coverage: float) -> bool:
        protector.apply(coverage)
        result = validate(protector.model, data.validation)
        ok = result["exact"] and result["max_logit_error"] <= budget
        trace.append({"coverage": coverage, "accepted": ok, **result})
        return ok

    good, bad = 0.0, 1.0
    if acceptable(1.0):
        protector.restore()
        return 1.0
    steps = bar(range(protector.opts.search_steps), desc="coverage search", unit="step")
    for _ in steps:
        mid = (good + bad) / 2.0
        ok = acceptable(mid)
        steps.set_postfix(coverage=f"{mid:.3f}", ok=ok)
        good, bad = (mid, bad) if ok else (good, mid)
    protector.restore()
    log(f"coverage search: largest accepted coverage {good:.3f} (token-exact, max logit error <= {budget})")
    return good
