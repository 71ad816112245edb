"""The TaylorMLP module: what evaluates released series coefficients, copied verbatim into every release beside
``modeling_taylormlp.py`` (runtime.py, which imports it relatively, so transformers' remote code and vLLM's
Transformers backend copy both), so that a release runs exactly this code.  It imports only torch and transformers.

For a protected channel j with released gate row ``V_j`` (times a secret-free ±1 sign), expansion point ``z0_j`` and
half width ``h_j``:

    z = V_j · x,   t = (z - z0_j) / h_j
    y = Σ_n Θ_n · φ_n(t)            (plain MLP)
    y = Σ_n Θ_n · (φ_n(t) ⊙ u)      (gated MLP, u = W_up x)

with φ_n(t) = tⁿ (basis "taylor") or the Chebyshev polynomial T_n(t) (basis "chebyshev"), built term by term with
their recurrences, and all orders applied as ONE stacked matmul with Θ = [Θ_0 | … | Θ_N].  Inputs outside the
calibrated interval (|t| > 1) are evaluated at the clamped point plus the first-order continuation φ_n(t_c) +
φ_n'(t_c)(t - t_c): exact inside, linear and bounded outside (never Inf/NaN).  Unprotected channels stay an ordinary
MLP (``rest``) whose output is added.  Piecewise layers (``pieces`` Q > protected P): piece q is one more series of
channel ``owner[q]`` with its own z0, h and Θ block, live where that channel's z lies in [edge_lo[q], edge_hi[q]); a
channel's pieces partition the line (outer edges ±inf), so exactly one piece serves each input.  Cost grows with Q.
"""

from __future__ import annotations

import functools
import warnings

import torch
import transformers
from torch import nn

BASES = ("taylor", "chebyshev")


def torch_activation(name: str):
    """The activation module transformers itself uses for this config name (bit-identical results; the rest MLP)."""
    name = "gelu_pytorch_tanh" if name == "gelu_tanh" else name
    try:
        return transformers.activations.ACT2FN[name]
    except KeyError as exc:
        raise ValueError(f"activation {name!r} is not supported") from exc


@functools.lru_cache(maxsize=None)
def edge_slopes(basis: str, order: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(φ_n'(+1), φ_n'(−1)) for n = 0..order (exact integers, as floats): the slopes of the runtime's linear
    continuation past ±1.  Power basis: φ_n' = n tⁿ⁻¹, so ±n;  Chebyshev: T_n'(±1) = (±1)ⁿ⁺¹ n²."""
    if basis not in BASES:
        raise ValueError(f"unknown basis {basis!r}; choose one of {BASES}")
    plus = tuple(float(n if basis == "taylor" else n * n) for n in range(order + 1))
    return plus, tuple(s if n % 2 else -s for n, s in enumerate(plus))  # odd n: same slope at -1, even n: negated


BLOCK = 1 << 17  # values per [rows, P] block of series_basis on a CPU: its working set stays in the core's cache


def series_basis(tc: torch.Tensor, excess: torch.Tensor, scale: torch.Tensor, order: int, basis: str,
                 dtype: torch.dtype) -> torch.Tensor:
    """[..., N+1, P] in `dtype`: scale·φ_n(t_c) for n = 0..N plus the linear continuation scale·φ_n'(±1)·excess past
    the interval (scale = u ⊙ live mask, folded into φ_0: the recurrence is linear), each order computed in tc's dtype
    and written once into the output (TaylorMLP.features); on a CPU in blocks of BLOCK values that stay in cache."""
    # the continuation is skipped when nothing is outside, known for free on the CPU; an accelerator would stall (and
    # no CUDA graph could be captured) to say so: there it is always added (+0 inside)
    outside, P = tc.device.type != "cpu" or bool((excess != 0).any()), tc.shape[-1]
    out = torch.empty(*tc.shape[:-1], order + 1, P, dtype=dtype, device=tc.device)
    rows = [t.reshape(-1, P) for t in (tc, excess, scale)] + [out.view(-1, order + 1, P)]
    step = max(1, BLOCK // max(P, 1)) if tc.device.type == "cpu" else max(rows[0].shape[0], 1)
    for first in range(0, rows[0].shape[0], step):
        _basis_block(*(r[first:first + step] for r in rows), order, basis, outside)
    return out


def _basis_block(tc, excess, scale, out, order: int, basis: str, outside: bool) -> None:
    """series_basis on one block of rows: out [R, N+1, P] ← the features of tc, excess, scale [R, P]."""
    phi = out.unbind(-2)  # views: φ_n is written once, in place
    if outside:  # φ_n'(−1) = ±φ_n'(+1): the term is φ_n'(+1) times scale·excess (same slope) or scale·|excess|
        plus, minus = edge_slopes(basis, order)
        slope = (scale * excess, scale * excess.abs())
    two_t = 2.0 * tc
    prev, cur = scale, scale * tc
    phi[0].copy_(prev)
    for n in range(1, order + 1):
        if n >= 2:  # Taylor: φ_n = φ_(n−1)·t;  Chebyshev: T_n = 2t T_(n−1) − T_(n−2)
            prev, cur = cur, (cur * tc if basis == "taylor" else two_t * cur - prev)
        phi[n].copy_(cur + plus[n] * slope[minus[n] != plus[n]] if outside else cur)


# series_basis as one opaque op for torch.compile (inlined, the recurrence unrolls into one expression growing with N:
# minutes of compiling at order 12); once a process, though a release's copy of this file may be imported beside ours
SERIES_BASIS_OP = "series_basis_v2"  # a new name whenever series_basis changes
if not hasattr(torch.ops.taylormlp, SERIES_BASIS_OP):
    torch.library.custom_op(f"taylormlp::{SERIES_BASIS_OP}", series_basis, mutates_args=(),  # schema not inferred
                            schema="(Tensor tc, Tensor excess, Tensor scale, int order, str basis, ScalarType dtype) "
                                   "-> Tensor").register_fake(
        lambda tc, excess, scale, order, basis, dtype: tc.new_empty(*tc.shape[:-1], order + 1, tc.shape[-1],
                                                                    dtype=dtype))
SERIES_BASIS = getattr(torch.ops.taylormlp, SERIES_BASIS_OP)


def piece_inputs(module, x: torch.Tensor):
    """Per series piece of `module` (a TaylorMLP, or anything with its gate/up/pieces/owner/edges): the channel's
    z = gate·x and u = up·x in float32 or wider, and which pieces are live (None: one piece per channel)."""
    index = (module.owner, module.edge_lo, module.edge_hi) if module.pieces > module.protected else None
    return select_pieces(module.gate(x), module.up(x) if module.up is not None else None, index)


def select_pieces(z: torch.Tensor, u, index=None):
    """z and u per channel -> per series piece, in float32 or wider, and which pieces are live: ``index`` is
    (owner, edge_lo, edge_hi), piece q reading channel owner[q] and live for z in [edge_lo[q], edge_hi[q]); None:
    one piece per channel (returned as they are, live everywhere: None)."""
    work = torch.promote_types(z.dtype, torch.float32)
    z = z.to(work)
    u = u.to(work) if u is not None else None
    if index is None:
        return z, u, None
    owner, edge_lo, edge_hi = index
    z = z[..., owner]  # piecewise: each piece reads its channel's z and is live on its own part
    u = u[..., owner] if u is not None else None
    return z, u, (z >= edge_lo.to(work)) & (z < edge_hi.to(work))


def piece_coordinates(z: torch.Tensor, z0: torch.Tensor, h: torch.Tensor):
    """t_c = t clamped to [-1, 1] with t = (z − z0)/h per piece, and the excess t − t_c (zero inside the calibrated
    interval); a NaN input counts as t = 0, so it cannot poison the series."""
    t = torch.nan_to_num((z - z0.to(z.dtype)) / h.to(z.dtype), nan=0.0)
    tc = t.clamp(-1.0, 1.0)
    return tc, t - tc


def stacked_features(tc: torch.Tensor, excess: torch.Tensor, u, active, order: int, basis: str,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """[..., (N+1)·Q] in `dtype` (default tc's): the basis φ_n(t) of every piece times the live mask and u (gated),
    series_basis (under torch.compile the custom op SERIES_BASIS): what the one stacked matmul with Θ reads."""
    build = SERIES_BASIS if torch.compiler.is_compiling() else series_basis
    return build(tc, excess, feature_scale(tc, u, active), order, basis, dtype or tc.dtype).flatten(-2)


def feature_scale(tc: torch.Tensor, u, active) -> torch.Tensor:
    """u ⊙ the live mask (each where there is one, else ones): what every order of a piece's features is scaled by."""
    scale = u if u is not None else torch.ones_like(tc)
    return scale * active.to(tc.dtype) if active is not None else scale


class RestMLP(nn.Module):
    """The unprotected channels, kept as an ordinary MLP (as in the authors' code)."""

    def __init__(self, family: str, hidden: int, channels: int, act: str, bias: bool, out_bias: bool):
        super().__init__()
        self.family = family
        self.act_name = act
        self.act = torch_activation(act)
        self.gate = nn.Linear(hidden, channels, bias=bias)
        self.up = nn.Linear(hidden, channels, bias=False) if family == "gated" else None
        self.down = nn.Linear(channels, hidden, bias=out_bias)

    def forward(self, x):
        a = self.act(self.gate(x))
        if self.up is not None:
            a = a * self.up(x)
        return self.down(a)


class TaylorMLP(nn.Module):
    """An MLP block whose protected channels are evaluated from series coefficients Θ_0..Θ_N."""

    def __init__(self, family: str, hidden: int, protected: int, rest: int, order: int, basis: str, act: str,
                 rest_bias: bool = False, rest_out_bias: bool = False, pieces: int | None = None):
        super().__init__()
        if basis not in BASES:
            raise ValueError(f"unknown basis {basis!r}; choose one of {BASES}")
        if family not in ("gated", "plain"):
            raise ValueError(f"unknown MLP family {family!r}")
        pieces = protected if pieces is None else pieces
        if pieces < protected:
            raise ValueError(f"a layer needs at least one series piece per protected channel ({pieces} < {protected})")
        self.family, self.hidden, self.protected, self.order, self.basis = family, hidden, protected, order, basis
        self.pieces = pieces
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        self.gate = nn.Linear(hidden, protected, bias=False)  # V (plain) or W_gate (gated), rows times ±1
        self.up = nn.Linear(hidden, protected, bias=False) if family == "gated" else None  # W_up
        # one series per piece; a channel's pieces partition the real line [edge_lo, edge_hi) (outer edges ±inf)
        self.z0 = nn.Parameter(torch.zeros(pieces), requires_grad=False)  # expansion points (times ±1)
        self.h = nn.Parameter(torch.ones(pieces), requires_grad=False)  # half widths of the intervals
        if pieces > protected:  # buffers, not parameters: an engine that re-creates parameters in its dtype (vLLM)
            # loads buffers as they are, so the piece -> channel index stays an integer tensor
            self.register_buffer("owner", torch.zeros(pieces, dtype=torch.long))
            self.register_buffer("edge_lo", torch.full((pieces,), -float("inf")))
            self.register_buffer("edge_hi", torch.full((pieces,), float("inf")))
        self.theta = nn.Parameter(torch.zeros(hidden, (order + 1) * pieces))  # [Θ_0 | Θ_1 | … | Θ_N]
        self.rest = RestMLP(family, hidden, rest, act, rest_bias, rest_out_bias) if rest > 0 else None

    def extra_repr(self) -> str:
        return (f"family={self.family}, protected={self.protected}, pieces={self.pieces}, order={self.order}, "
                f"basis={self.basis}")

    def coordinates(self, x: torch.Tensor):
        """Per piece: t_c = t clamped to [-1, 1] with t = (z − z0)/h, the excess t − t_c (zero inside the calibrated
        interval), u (gated) and which pieces are live (None: one piece per channel); float32 or wider."""
        z, u, active = piece_inputs(self, x)
        return (*piece_coordinates(z, self.z0, self.h), u, active)

    def features(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[..., (N+1)·P] stacked basis features φ_n(t) (⊙ u for gated MLPs), computed in float32 or wider and written
        in `dtype` (default: that): series_basis, in place and bit-identical to the formulas; under torch.compile
        (vLLM, CUDA graphs) the custom op SERIES_BASIS; with autograd recording, the out-of-place form."""
        inputs = [x, self.gate.weight, self.z0, self.h] + ([self.up.weight] if self.up is not None else [])
        if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
            return self.features_differentiable(x, dtype)
        return stacked_features(*self.coordinates(x), self.order, self.basis, dtype)

    def features_differentiable(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """features() out of place, as the formulas read (autograd runs through it; the in-place form is tested against
        it bit for bit): no branch on a tensor's value, no write into a view; the continuation is always added."""
        tc, excess, u, active = self.coordinates(x)
        scale = feature_scale(tc, u, active)
        phi = [scale, scale * tc]  # scale·φ_0, scale·φ_1
        for _ in range(2, self.order + 1):  # Taylor: φ_n = φ_(n−1)·t;  Chebyshev: T_n = 2t T_(n−1) − T_(n−2)
            phi.append(phi[-1] * tc if self.basis == "taylor" else 2.0 * tc * phi[-1] - phi[-2])
        plus, minus = edge_slopes(self.basis, self.order)  # φ_n'(±1)·excess past the interval (0 inside)
        slope = (scale * excess, scale * excess.abs())  # on the left, φ_n'(−1)·excess = φ_n'(+1)·(±excess)
        terms = [phi[0]] + [phi[n] + plus[n] * slope[minus[n] != plus[n]] for n in range(1, self.order + 1)]
        return torch.stack(terms, dim=-2).flatten(-2).to(dtype or tc.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.protected == 0:  # a layer with no protected channel is its rest MLP alone (no zero-width matmul)
            return self.rest(x)
        y = nn.functional.linear(self.features(x, self.theta.dtype), self.theta).to(x.dtype)  # one stacked matmul
        if self.rest is not None:
            y = y + self.rest(x)
        return y
