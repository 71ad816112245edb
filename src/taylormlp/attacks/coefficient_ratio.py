"""Coefficient-ratio attack: W_down, the sign obfuscation and (plain family) the hidden biases in closed form.

For protected channel j the released block Θ_{·,·,j} ∈ R^{d × (N+1)} is W_j ⊗ (c_{j,n} s_jⁿ)_n, where
c_{j,n}(mid_j) are the basis coefficients of act(mid_j + h_j t) — a KNOWN function of one unknown scalar
mid_j, since the activation, the basis and the half width h_j are all public.  Equivalently, c_{j,n} s_jⁿ are
the coefficients of act(mid_j + s_j h_j t).  So:

* gated family (no biases): the released z0_j = s_j·mid_j, so only two candidates (s = ±1) exist; the one
  whose coefficient vector is parallel to Θ's rows wins;
* plain family: mid_j = a_j's calibrated midpoint is unknown (b_j is hidden) — a 1-D search per channel and
  sign (grid, then golden section) for the coefficient vector most parallel to the orders n ≥ 1 (order 0 also
  carries the folded output bias c/P).

Then W_j = least-squares scale of Θ_j onto c (W_j = Θ_j·c / ‖c‖²), the original gate row V_j = s_j·(released
row), b_j = mid_j − s_j·z0_j, and c = Σ_j (Θ_{·,0,j} − W_j c_{j,0}).  No query of the model is needed.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..maths import series
from .context import AuditContext, RecoveredLayer, Timer, one_piece_per_channel, rebuild_model, theta_blocks
from .registry import register_attack, register_layerwise

NAME = "coefficient_ratio"
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _coefficients(basis: str, act: str, mid: np.ndarray, h: np.ndarray, order: int, s: float) -> np.ndarray:
    """Signed coefficients c_n(mid) sⁿ of act(mid + s·h·t); shape mid.shape + (order+1,)."""
    c = series.series_coefficients(basis, act, mid - h, mid + h, order)
    return c * (s ** np.arange(order + 1))


def _misfit(c: np.ndarray, gram: np.ndarray, trace: np.ndarray) -> np.ndarray:
    """1 − ‖B ĉ‖²/‖B‖²: the share of Θ_j not explained by the direction c (0 = exactly parallel).
    c [P, ..., k], gram [P, k, k], trace [P]."""
    extra = c.ndim - 2
    g = gram.reshape(gram.shape[:1] + (1,) * extra + gram.shape[1:])
    q = np.einsum("...k,...kl,...l->...", c, g, c)
    norm = (c * c).sum(-1)
    t = trace.reshape(trace.shape + (1,) * extra)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = 1.0 - q / (norm * t)
    return np.where(np.isfinite(out), out, np.inf)


def _search_mid(basis, act, h, gram, trace, order, used, s, lo=-30.0, hi=30.0, points=1201, iters=60,
                starts=8, chunk=64) -> tuple[np.ndarray, np.ndarray]:
    """Per channel: mid minimising the misfit.  Grid on [lo, hi]; the `starts` lowest local minima of the grid
    are each refined by golden section (the misfit has shallow spurious minima in the activation's tails)."""
    P = len(h)
    grid = np.linspace(lo, hi, points)
    step = grid[1] - grid[0]
    cand = np.empty((P, starts))
    for start in range(0, P, chunk):
        sl = slice(start, start + chunk)
        mids = np.broadcast_to(grid, (len(h[sl]), points))
        c = _coefficients(basis, act, mids, np.broadcast_to(h[sl, None], mids.shape), order, s)[..., used]
        f = _misfit(c, gram[sl], trace[sl])  # [p, points]
        padded = np.pad(f, ((0, 0), (1, 1)), constant_values=np.inf)
        local = (f <= padded[:, :-2]) & (f <= padded[:, 2:])
        ranked = np.where(local, f, np.inf)
        idx = np.argsort(ranked, axis=1, kind="stable")[:, :starts]
        # channels with fewer local minima than `starts`: repeat their best one
        ok = np.take_along_axis(np.isfinite(ranked), idx, 1)
        idx = np.where(ok, idx, idx[:, :1])
        cand[sl] = grid[idx]

    hk = np.broadcast_to(h[:, None], cand.shape)
    gk, tk = gram[:, None], trace[:, None]

    def f(m):
        c = _coefficients(basis, act, m, hk, order, s)[..., used]
        q = np.einsum("pmk,pxkl,pml->pm", c, gk, c)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = 1.0 - q / ((c * c).sum(-1) * tk)
        return np.where(np.isfinite(out), out, np.inf)

    a, b = cand - step, cand + step
    x1, x2 = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    f1, f2 = f(x1), f(x2)
    for _ in range(iters):
        left = f1 < f2
        b = np.where(left, x2, b)
        a = np.where(left, a, x1)
        x2n = np.where(left, x1, a + GOLDEN * (b - a))
        x1n = np.where(left, b - GOLDEN * (b - a), x2)
        x1, x2 = x1n, x2n
        f1, f2 = f(x1), f(x2)
    mids = (a + b) / 2.0
    fm = f(mids)
    k = np.argmin(fm, axis=1)
    return np.take_along_axis(mids, k[:, None], 1)[:, 0], np.take_along_axis(fm, k[:, None], 1)[:, 0]


def recover_layer(mlp, act: str, search: dict | None = None) -> tuple[RecoveredLayer, dict]:
    """Closed-form recovery of one TaylorMLP's protected channels."""
    B = theta_blocks(mlp).numpy()  # [P, d, K]
    P, d, K = B.shape
    N = K - 1
    h = mlp.h.detach().double().numpy()
    z0 = mlp.z0.detach().double().numpy()
    gated = mlp.family == "gated"
    used = np.arange(K) if gated else np.arange(1, K)  # plain: order 0 also holds c/P
    Bu = B[..., used]
    gram = np.einsum("pdk,pdl->pkl", Bu, Bu)
    trace = np.einsum("pkk->p", gram)
    cands = []
    for s in (1.0, -1.0):
        if gated:
            mid = s * z0
            fit = _misfit(_coefficients(mlp.basis, act, mid, h, N, s)[..., used], gram, trace)
        else:
            mid, fit = _search_mid(mlp.basis, act, h, gram, trace, N, used, s, **(search or {}))
        cands.append((s, mid, fit))
    pick_plus = cands[0][2] <= cands[1][2]
    sign = np.where(pick_plus, 1.0, -1.0)
    mid = np.where(pick_plus, cands[0][1], cands[1][1])
    fit = np.where(pick_plus, cands[0][2], cands[1][2])
    coef = np.where(pick_plus[:, None], _coefficients(mlp.basis, act, mid, h, N, 1.0),
                    _coefficients(mlp.basis, act, mid, h, N, -1.0))
    cu = coef[:, used]
    W = np.einsum("pdk,pk->pd", Bu, cu) / np.maximum((cu * cu).sum(-1), 1e-300)[:, None]  # [P, d]
    gate = mlp.gate.weight.detach().double()
    V = torch.from_numpy(sign)[:, None] * gate
    b = c = None
    if not gated:
        b = torch.from_numpy(mid - sign * z0)
        c = torch.from_numpy((B[:, :, 0] - W * coef[:, :1]).sum(0))
    U = mlp.up.weight.detach().double() if mlp.up is not None else None
    rec = RecoveredLayer(V=V, b=b, U=U, W=torch.from_numpy(W.T.copy()), c=c)
    info = {"misfit_max": float(np.max(fit)) if P else 0.0,
            "theta_residual": float(np.sqrt(np.sum(np.clip(fit, 0, None) * trace) / max(np.sum(trace), 1e-300))),
            "sign": sign, "mid": mid}
    return rec, info


@register_layerwise(NAME)
def recover(mlp, act: str, x=None, search: dict | None = None) -> tuple[RecoveredLayer, dict, np.ndarray]:
    """One layer, from its TaylorMLP alone: (recovered weights, {misfit_max, theta_residual_max}, signs)."""
    rec, info = recover_layer(one_piece_per_channel(mlp), act, search)
    return rec, {"misfit_max": info["misfit_max"], "theta_residual_max": info["theta_residual"]}, info["sign"]


@register_attack(NAME)
def run(ctx: AuditContext, search: dict | None = None) -> dict:
    timer = Timer()
    recovered, misfits, residuals, signs = {}, [], [], {}
    with timer:
        for i, mlp in ctx.layers:
            if mlp.protected == 0:
                continue
            recovered[i], numbers, signs[i] = recover(mlp, ctx.act, search=search)
            misfits.append(numbers["misfit_max"])
            residuals.append(numbers["theta_residual_max"])
        attacker = rebuild_model(ctx.release, recovered)
    out = {
        "relative_weight_error": None,
        "wall_time_s": timer.elapsed,
        "channels": int(sum(m.protected for _, m in ctx.layers)),
        "theta_residual_max": float(max(residuals)) if residuals else 0.0,
        "misfit_max": float(max(misfits)) if misfits else 0.0,
        "queries": 0,  # closed form from Θ: the model is never run
    }
    score = ctx.score_weights(recovered)
    if score is not None:
        out.update(score)
        out["sign_accuracy"] = ctx.sign_accuracy(signs)
    return ctx.conclude(NAME, attacker, out)
