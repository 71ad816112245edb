"""The layer builder and the Protector: one layer's TaylorMLP from its MLP weights, and every layer planned once.

For layer ℓ and protected channel j (activation coordinates a = z + b, calibrated interval [lo_j, hi_j]):

    mid_j = (lo_j + hi_j)/2,  h_j = (hi_j - lo_j)/2,  t = (a - mid_j)/h_j
    act(a) ≈ Σ_n c_{j,n} φ_n(t)                         (series.series_coefficients)
    Θ_{·,n,j} = W_{·,j} · c_{j,n} · s_jⁿ                 (s_j = ±1 sign obfuscation)
    released gate row = s_j V_j,  released z0_j = s_j (mid_j - b_j)

The bias b_j lives only inside c_{j,n} (through mid_j) and z0_j; the output bias c is folded into Θ_0
(c / P added to every protected channel's order-0 column).  W and the biases of protected channels are
not stored anywhere in the module.  A channel served by several pieces (pieces.split_pieces) gets the same
construction per piece q: Θ_{·,n,q} = W_{·,j(q)} · c_{q,n} · s_jⁿ, live on its part of the line.

The cost model (channel_work) lives here too: the throttle predicts slowdowns from it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from .. import runtime
from ..common.errors import TaylorMLPError
from ..common.hooks import swapped
from ..common.progress import bar
from ..maths import series
from ..maths.pieces import Pieces, split_pieces
from ..measure.cost import channel_work
from ..release.directory import save_streamed_release
from ..release.stream import ModuleMLPs, module_mlp_tensors
from .calibration import Ranges
from .options import ProtectOptions

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
    return weights_from_tensors(module_mlp_tensors(mlp, arch), arch, layer_index)


# ---------------------------------------------------------------- one layer


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

    def pieces_per_channel(self) -> np.ndarray:
        return np.bincount(self.pieces.owner, minlength=len(self.score))


class CandidateMLP(torch.nn.Module):
    """Stands in for a layer's MLP while a coverage is tried: builds that layer's TaylorMLP for `mask` from the
    weight reader when called, and drops it after the call.  It registers no tensors, so a streamed layer onloads
    nothing for it, and nothing per layer stays."""

    def __init__(self, protector: "Protector", index: int, mask: np.ndarray):
        super().__init__()
        self.index = index
        object.__setattr__(self, "_protector", protector)  # not a child module
        object.__setattr__(self, "_mask", mask)

    def forward(self, x):
        module = self._protector.build(self.index, self._mask).to(x.device)
        y = module(x)
        del module  # freed here (reference counting); the heap is trimmed once per validation, not per layer
        return y


class Protector:
    """Plans every layer once (series pieces, channel ranking, signs) reading one layer's MLP weights at a time,
    then builds any coverage: `apply` for validation passes, `build` for the release writer."""

    def __init__(self, model, ranges: Ranges, opts: ProtectOptions, mlps=None, streamed: bool = False,
                 splits: dict | None = None):
        self.model, self.opts, self.streamed, self.splits = model, opts, streamed, splits
        self.arch = runtime.architecture(model.config)
        self.act = runtime.activation_name(model.config)
        try:
            series.canonical_activation(self.act)
        except ValueError as exc:
            raise TaylorMLPError(str(exc)) from exc
        self.layers = runtime.decoder_layers(model)
        self.originals = [layer.mlp for layer in self.layers]
        if any(isinstance(mlp, (runtime.TaylorMLP, CandidateMLP)) for mlp in self.originals):
            raise TaylorMLPError("this model's MLPs are TaylorMLPs already: protect the original model, not a release")
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

    def weights(self, i: int, check: bool = False) -> MLPWeights:
        return weights_from_tensors(self.mlps.tensors(i), self.arch, i, check)

    def _plan(self, i: int, w: MLPWeights, lo: np.ndarray, hi: np.ndarray, rng) -> LayerPlan:
        opts = self.opts
        width = np.maximum(hi - lo, 1e-3)
        mid = (lo + hi) / 2.0
        lo, hi = mid - width * (0.5 + opts.margin), mid + width * (0.5 + opts.margin)
        pieces, piece_error = split_pieces(opts.basis, self.act, lo, hi, opts.order, opts.piece_tolerance,
                                           opts.max_pieces, opts.piece_order, self.splits)
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

    def channel_work(self) -> tuple[np.ndarray, np.ndarray]:
        """Per channel of every layer (layer order, unranked): (Θ values, extra multiply-adds per token) were it
        protected, by channel_work."""
        work = [channel_work(plan.hidden, self.opts.order, plan.pieces_per_channel()) for plan in self.plans]
        return np.concatenate([v for v, _ in work]), np.concatenate([e for _, e in work])

    def layer_work(self, coverage: float) -> tuple[np.ndarray, np.ndarray]:
        """Per layer, for `coverage`: (Θ values, extra multiply-adds per token over the original MLP)."""
        values, extra = self.channel_work()
        chosen = np.concatenate(self.masks(coverage))
        bounds = np.cumsum(self.sizes)[:-1]
        return (np.array([v.sum() for v in np.split(values * chosen, bounds)], dtype=np.int64),
                np.array([e.sum() for e in np.split(extra * chosen, bounds)], dtype=np.int64))

    def masks(self, coverage: float) -> list[np.ndarray]:
        k = int(round(coverage * self.total))
        chosen = np.zeros(self.total, dtype=bool)
        chosen[self.order_index[:k]] = True
        return np.split(chosen, np.cumsum(self.sizes)[:-1])

    def build(self, i: int, mask: np.ndarray) -> runtime.TaylorMLP:
        plan = self.plans[i]
        return build_taylor_mlp(self.weights(i), self.arch["family"], self.act, plan.pieces, mask, plan.signs,
                                self.opts.order, self.opts.basis, self.dtype)

    def release_spec(self, coverage: float, record: dict) -> runtime.ReleaseSpec:
        """The typed release spec of `coverage`: settings, per-layer shapes, and `record` (what the run measured)."""
        masks, opts, layers = self.masks(coverage), self.opts, []
        for plan, mask in zip(self.plans, masks):
            P = int(mask.sum())
            Q = int(np.isin(plan.pieces.owner, np.flatnonzero(mask)).sum())
            layers.append(runtime.LayerShape(protected=P, rest=int(mask.size - P), pieces=Q,
                                             rest_out_bias=bool(plan.has_c and P == 0)))
        return runtime.ReleaseSpec(
            family=self.arch["family"], hidden_size=int(self.plans[0].hidden), activation=self.act,
            order=int(opts.order), basis=opts.basis, coverage=sum(int(m.sum()) for m in masks) / self.total,
            layers=layers, rest_bias=bool(self.plans[0].has_b), preset=opts.preset, selection=opts.selection,
            margin=float(opts.margin), max_pieces=int(opts.max_pieces), record=record)

    def write_release(self, out, spec: runtime.ReleaseSpec, tensors, dtype, tokenizer, **kwargs):
        """Write the release of `spec` layer by layer: the model's other tensors from `tensors` (a streamed source or
        release.ModelTensors), each layer's TaylorMLP built as it is written (the model itself is left as it is)."""
        masks = self.masks(spec.coverage)
        config = copy.deepcopy(self.model.config)
        config.taylormlp = spec.to_dict()
        return save_streamed_release(out, config, tensors, lambda i: self.build(i, masks[i]), dtype, tokenizer,
                                     **kwargs)

    def modules(self, coverage: float, materialize: bool | None = None, only=None) -> dict:
        """{layer index: MLP} for `coverage`: real TaylorMLP modules (materialize=True, the default for a model in
        memory), or candidates that build each layer's module when it runs and drop it after (the default when
        streamed).  `only`: the layer indices to build (the others keep their original MLP); default all."""
        materialize = not self.streamed if materialize is None else materialize
        out = {}
        for i, mask in enumerate(self.masks(coverage)):
            if only is not None and i not in only:
                continue
            if materialize:
                out[i] = self.build(i, mask).to(_module_device(self.originals[i]))
            else:
                out[i] = CandidateMLP(self, i, mask)
        return out

    def installed(self, coverage: float, materialize: bool | None = None, only=None):
        """A context manager: `coverage`'s MLPs in the model inside it, the original MLPs back after it."""
        return swapped(self.layers, self.modules(coverage, materialize, only))

    def apply(self, coverage: float) -> list[np.ndarray]:
        """Install `coverage`'s TaylorMLP modules for good (protect's result); returns the masks."""
        for i, mlp in self.modules(coverage, materialize=True).items():
            self.layers[i].mlp = mlp
        return self.masks(coverage)


def _module_device(module) -> torch.device:
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")
