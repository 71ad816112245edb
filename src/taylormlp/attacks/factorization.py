"""Factorization (speed) attack: collapse the N+1 stacked matmuls into one, without knowing the activation.

Channel j's released coefficients Θ_{·,·,j} ∈ R^{d × (N+1)} are W_j ⊗ (c_{j,n} s_jⁿ)_n: rank one.  Its SVD
gives w_j ∈ R^d and q_j ∈ R^{N+1} with Θ_j = w_j q_jᵀ, so

    y = Σ_j w_j · p_j(t_j) (⊙ u_j),     p_j(t) = Σ_n q_{j,n} φ_n(t)

— an elementwise polynomial per channel (Horner for the power basis, Clenshaw for Chebyshev; with the
runtime's own clamp and linear continuation outside [-1, 1]) followed by ONE [d × P] matmul.  The release's
throttle (N+1 times the down-projection work) is gone.  In the plain family the order-0 column also holds
the folded output bias c/P; since φ_0 = 1 that column is a constant, so the rank-1 fit uses orders n ≥ 1 and
Σ_j Θ_{·,0,j} becomes one bias vector.  Piecewise releases collapse the same way piece by piece (y = one
[d × Q] matmul of the live pieces' polynomials).  No activation, no sign and no bias needs to be known.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .. import runtime
from ..maths.series import series_slopes, series_values
from ..measure.decode import decode_speed
from .context import AuditContext, RecoveredLayer, Timer, theta_blocks
from .registry import register_attack, register_layerwise

NAME = "factorization"


class CollapsedMLP(nn.Module):
    """y = W · p(t) (⊙ u) + β (+ rest): one matmul after an elementwise polynomial."""

    def __init__(self, mlp: "runtime.TaylorMLP", w: torch.Tensor, q: torch.Tensor, bias: torch.Tensor | None,
                 piece_bias: torch.Tensor | None = None):
        super().__init__()
        dtype = mlp.theta.dtype
        self.basis, self.order = mlp.basis, mlp.order
        self.gate = mlp.gate
        self.up = mlp.up
        self.rest = mlp.rest
        self.pieces, self.protected = mlp.pieces, mlp.protected
        if mlp.pieces > mlp.protected:  # piecewise release: the polynomials collapse per piece
            self.register_buffer("owner", mlp.owner.detach().clone())
            self.register_buffer("edge_lo", mlp.edge_lo.detach().clone())
            self.register_buffer("edge_hi", mlp.edge_hi.detach().clone())
        self.register_buffer("z0", mlp.z0.detach().clone())
        self.register_buffer("h", mlp.h.detach().clone())
        self.register_buffer("q", q.to(torch.float32 if dtype != torch.float64 else dtype))  # [N+1, P]
        self.piece_bias = piece_bias.to(dtype) if piece_bias is not None else None  # [d, Q]
        self.down = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None).to(dtype)
        with torch.no_grad():
            self.down.weight.copy_(w.to(dtype))
            if bias is not None:
                self.down.bias.copy_(bias.to(dtype))
        # slopes of p at t = ±1 for the runtime's linear continuation outside the interval
        plus, minus = series_slopes(self.basis, q.double().T)
        self.register_buffer("slope_plus", plus.to(self.q.dtype))
        self.register_buffer("slope_minus", minus.to(self.q.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, u, active = runtime.piece_inputs(self, x)
        work = z.dtype
        active = active.to(work) if active is not None else None
        t = (z - self.z0.to(work)) / self.h.to(work)
        # p(t) = Σ q_n φ_n(t) with the runtime's clamp and continuation (q.T: coefficients [P, N+1], order last)
        p = series_values(self.basis, self.q.to(work).T, t,
                                  slopes=(self.slope_plus.to(work), self.slope_minus.to(work)))
        if active is not None:
            p = p * active
        if u is not None:
            p = p * u
        y = self.down(p.to(self.down.weight.dtype)).to(x.dtype)
        if active is not None and self.piece_bias is not None:  # plain family: order-0 columns of the live pieces
            y = y + nn.functional.linear(active.to(self.piece_bias.dtype), self.piece_bias).to(x.dtype)
        if self.rest is not None:
            y = y + self.rest(x)
        return y


def collapse(mlp) -> tuple[CollapsedMLP, dict]:
    """Rank-1 factorization of every channel's coefficient block."""
    B = theta_blocks(mlp)  # [P, d, K]
    P, d, K = B.shape
    gated = mlp.family == "gated"
    lo = 0 if gated else 1
    U, S, Vh = torch.linalg.svd(B[:, :, lo:], full_matrices=False)  # batched over channels
    w = U[:, :, 0] * S[:, :1]  # [P, d]
    q = torch.zeros(P, K, dtype=torch.float64)
    q[:, lo:] = Vh[:, 0, :]
    piecewise = mlp.pieces > mlp.protected
    bias = None if gated or piecewise else B[:, :, 0].sum(0)
    piece_bias = B[:, :, 0].T.contiguous() if piecewise and not gated else None  # live pieces only
    rank_ratio = (S[:, 1] / S[:, 0].clamp_min(1e-300)) if S.shape[1] > 1 else torch.zeros(P, dtype=torch.float64)
    module = CollapsedMLP(mlp, w.T.contiguous(), q.T.contiguous(), bias, piece_bias)
    return module, {"rank1_residual_max": float(rank_ratio.max()) if P else 0.0}


@torch.no_grad()
def block_diff(mlp, module: CollapsedMLP, x: torch.Tensor) -> dict:
    """How far the collapsed block is from the release's on block inputs `x` [n, d] (largest and relative)."""
    x = x.to(mlp.theta.dtype)
    ref, got = mlp(x).double(), module(x).double()
    return {"block_max_abs_diff": float((got - ref).abs().max()),
            "block_relative_diff": float((got - ref).norm() / ref.norm().clamp_min(1e-300))}


@register_layerwise(NAME, up_to_scale=True)
def recover(mlp, act: str, x: torch.Tensor | None = None, speed: bool = False) -> tuple[RecoveredLayer, dict, None]:
    """One layer, from its TaylorMLP alone (no activation needed): W up to scale, the rank-1 residual and, on block
    inputs `x`, how exact the collapse is.  `speed` is run()'s decode timing of the whole model: nothing to time
    in one layer, so it is accepted and ignored."""
    module, info = collapse(mlp)
    if x is not None:
        info.update(block_diff(mlp, module, x))
    return as_recovered(module), info, None


def shared_copy(model, replace: dict):
    """A copy of `model` with some modules replaced, sharing every other parameter (no extra weight memory)."""
    memo = {id(old): new for old, new in replace.items()}
    for p in model.parameters():
        if id(p) not in memo:
            memo[id(p)] = p
    for b in model.buffers():
        if id(b) not in memo:
            memo[id(b)] = b
    return copy.deepcopy(model, memo)


@register_attack(NAME)
def run(ctx: AuditContext, speed: bool = True) -> dict:
    timer = Timer()
    replace, infos = {}, []
    with timer:
        for _, mlp in ctx.layers:
            if mlp.protected == 0:
                continue
            module, info = collapse(mlp)
            replace[mlp] = module
            infos.append(info)
        attacker = shared_copy(ctx.release, replace).eval()
    # fidelity of the collapsed blocks on the attacker's text (the block inputs of the release)
    inputs = ctx.layer_inputs()
    max_abs = max_rel = 0.0
    for i, mlp in ctx.layers:
        if mlp in replace:
            diff = block_diff(mlp, replace[mlp], inputs[i][:2048])
            max_abs, max_rel = max(max_abs, diff["block_max_abs_diff"]), max(max_rel, diff["block_relative_diff"])
    out = {
        "relative_weight_error": None,
        "wall_time_s": timer.elapsed,
        "rank1_residual_max": max(i["rank1_residual_max"] for i in infos) if infos else 0.0,
        "block_max_abs_diff": max_abs,
        "block_relative_diff": max_rel,
    }
    score = ctx.score_weights({i: as_recovered(replace[m]) for i, m in ctx.layers if m in replace},
                              up_to_scale=True)
    if score is not None:
        out["weight_error_up_to_scale"] = score["relative_weight_error"]
    if speed:
        models = {"release": ctx.release, "attacker": attacker}
        if ctx.original is not None:
            models["original"] = ctx.original
        prompt = ctx.eval_prompts()[0]
        tps = decode_speed(models, prompt, ctx.options.speed_tokens, ctx.options.speed_repeats)
        out["tokens_per_s"] = tps
        out["speedup_vs_release"] = tps["attacker"] / tps["release"]
        if "original" in tps:
            out["release_slowdown_vs_original"] = tps["original"] / tps["release"]
            out["attacker_slowdown_vs_original"] = tps["original"] / tps["attacker"]
    return ctx.conclude(NAME, attacker, out)


def as_recovered(module: CollapsedMLP) -> RecoveredLayer:
    W = module.down.weight.detach().double()
    if module.pieces > module.protected:  # every piece's column is W_j up to scale: score the first of each channel
        W = W[:, torch.searchsorted(module.owner, torch.arange(module.protected))]
    return RecoveredLayer(V=module.gate.weight.detach().double(), b=None, U=None, W=W, c=None)
