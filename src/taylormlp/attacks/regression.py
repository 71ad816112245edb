"""Regression attack: query the released MLP block, regress its output on public features.

Never reads Θ.  Inputs: the MLP inputs x of every protected layer while the release reads the attacker's
own text.  Outputs: y = block(x) − rest(x) (the unprotected channels are public).  Public features come from
the released gate rows (times the unknown sign s_j), W_up rows, z0 and h.

The sign needs no guessing, thanks to an identity shared by SiLU and both GELUs:

    act(x) − act(−x) = x        (x·σ(x) − (−x)·σ(−x) = x, and the same with Φ or the tanh form)

so act(s·z) = act(z) − [s = −1]·z, and the span of {act(z), z} contains the true feature for either sign.

* gated family: y = Σ_j W_j act(s_j z_j) u_j.  Regress y on [act(z) ⊙ u, z ⊙ u] (2P columns): the first
  block's coefficients ARE W (either sign); the second is 0 (s = +1) or −W_j (s = −1), which reveals s_j.
  Better still ("series" features, the default picks the better fit): since z0_j = s_j·mid_j and h_j, the
  activation, the basis and the order are public, the attacker can evaluate, for s = ±1, exactly the
  polynomial p_s(t) the release evaluates for each channel (with its clamp and linear continuation) and
  regress on [p₊ ⊙ u, (p₋ − p₊) ⊙ u]: exact up to float32 noise instead of up to the release's own
  approximation error (on SmolLM2's paper-preset release: ~1e-4–1e-6 relative instead of ~1e-2).
* plain family: y = Σ_j W_j act(s_j h_j t_j + mid_j) + c with mid_j unknown (b_j is hidden).  By the
  identity, y = Σ_j W_j (act(h_j t_j + m_j) − σ_j h_j t_j) + const with m_j = s_j mid_j, σ_j = [s_j = −1].
  Stage 1: the sign terms are affine in x, so fit Σ_j W_j act(h_j t_j + m_j) + A x + const (variable
  projection: linear least squares for W, A, const; Levenberg–Marquardt with a per-channel trust region on
  Kaufman's Jacobian for m, from m = 0); A = −Σ_j σ_j W_j G_jᵀ is linear in σ, which gives the signs.
  A per-channel global grid sweep between two LM runs escapes local minima.  Then σ by least squares on A,
  a sweep over (m_j, σ_j) with the sign terms tied to their channels (now first-order terms pin m_j too),
  and a final Levenberg–Marquardt polish.  b_j = s_j m_j − s_j z0_j, c follow.
  Conditioning: a channel's m_j shows only through the curvature of act over its interval, so NARROW
  calibrated intervals (h ≲ 0.3) make this black-box fit ill-conditioned at float32 output precision; the
  coefficient-ratio attack has no such limit.

The release evaluates a polynomial only inside each channel's calibrated interval (|t| ≤ 1) and a linear
continuation outside, so rows with every |t| ≤ 1 are preferred (the attacker can check this: z0 and h are
public).  With activation features, recovery is as exact as the release's own approximation of the
activation on those rows; with series features (gated family) it is exact.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..maths import series
from ..maths.series import series_values
from ..runtime import torch_activation
from .context import AuditContext, RecoveredLayer, Timer, act_and_derivative, one_piece_per_channel, rebuild_model
from .registry import register_attack

NAME = "regression"


def _block_output(mlp, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """y = protected part of the block on inputs x (float64), by querying the released module."""
    outs = []
    with torch.no_grad():
        for s in range(0, len(x), chunk):
            xs = x[s:s + chunk]
            y = mlp(xs)
            if mlp.rest is not None:
                y = y - mlp.rest(xs)
            outs.append(y.double())
    return torch.cat(outs, 0)


def _select_rows(t: torch.Tensor, need: int) -> tuple[torch.Tensor, int]:
    """Rows with every |t| ≤ 1; if fewer than `need`, add the rows that leave the intervals least."""
    worst = t.abs().amax(1)
    inside = int((worst <= 1.0).sum())
    k = min(len(worst), max(inside, need))
    return torch.argsort(worst)[:k], inside


def _lstsq(D: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Least squares with column scaling (features differ in scale by orders of magnitude)."""
    scale = D.norm(dim=0).clamp_min(1e-300)
    sol = torch.linalg.lstsq(D / scale, Y, driver="gelsy").solution
    return sol / scale[:, None]


def _lstsq_fast(D: torch.Tensor, Y: torch.Tensor, max_cond: float = 1e7) -> torch.Tensor:
    """Normal equations with column scaling (float64 Cholesky, several times faster than a pivoted QR on
    thousands of columns); falls back to `_lstsq` when the scaled Gram matrix is too ill-conditioned."""
    scale = D.norm(dim=0).clamp_min(1e-300)
    Ds = D / scale
    gram = Ds.T @ Ds
    L, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        diag = torch.diagonal(L)
        if float(diag.max() / diag.min()) ** 2 < max_cond:
            return torch.cholesky_solve(Ds.T @ Y, L) / scale[:, None]
    return _lstsq(D, Y)


def recover_gated(mlp, act: str, x: torch.Tensor, features: str = "best") -> tuple[RecoveredLayer, dict]:
    """features: "activation" (act(z) ⊙ u and z ⊙ u), "series" (the release's own per-channel polynomial for
    either sign: the activation, basis, order, z0 = s·mid and h are public, so for s = ±1 the attacker can
    evaluate exactly what the release evaluates — Θ is never read), or "best" (both, keep the better fit)."""
    if features not in ("activation", "series", "best"):
        raise ValueError(f"features must be 'activation', 'series' or 'best', got {features!r}")
    P = mlp.protected
    G = mlp.gate.weight.detach().double()
    U = mlp.up.weight.detach().double()
    z0, h = mlp.z0.detach().double(), mlp.h.detach().double()
    z = x @ G.T
    t = (z - z0) / h
    rows, inside = _select_rows(t, need=int(math.ceil(2.5 * P)) + 8)
    Y = _block_output(mlp, x[rows].to(mlp.theta.dtype))
    xr = x[rows]
    z, t, u = z[rows], t[rows], xr @ U.T
    fits = []
    if features in ("activation", "best"):
        a, _ = act_and_derivative(act, z)
        fits.append(("activation", torch.cat([a * u, z * u], 1)))
    if features in ("series", "best"):
        cols = []
        for s in (1.0, -1.0):
            mid = (s * z0).numpy()
            c = series.series_coefficients(mlp.basis, act, mid - h.numpy(), mid + h.numpy(), mlp.order)
            c = torch.from_numpy(c * s ** np.arange(mlp.order + 1))
            cols.append(series_values(mlp.basis, c, t) * u)  # exactly what the release evaluates
        # columns: [p₊ u, p₋ u − p₊ u]: the first block's coefficients are W for either sign
        fits.append(("series", torch.cat([cols[0], cols[1] - cols[0]], 1)))
    best = None
    for name, D in fits:
        coef = _lstsq_fast(D, Y)  # [2P, d]
        resid = float((Y - D @ coef).norm() / Y.norm().clamp_min(1e-300))
        if best is None or resid < best[1]:
            best = (name, resid, coef)
    name, resid, coef = best
    W, lam = coef[:P], coef[P:]
    if name == "activation":  # act(−z) = act(z) − z: second block is 0 (s = +1) or −W (s = −1)
        sign = torch.where((lam + W).norm(dim=1) < lam.norm(dim=1), -1.0, 1.0).double()
    else:  # W_j p_{s}(t) u = W_j p₊ u + [s = −1] W_j (p₋ − p₊) u: the second block is 0 or W_j
        sign = torch.where((lam - W).norm(dim=1) < lam.norm(dim=1), -1.0, 1.0).double()
    rec = RecoveredLayer(V=sign[:, None] * G, b=None, U=U, W=W.T.contiguous(), c=None)
    return rec, {"rows": len(rows), "rows_inside": inside, "fit_residual": resid, "sign": sign,
                 "underdetermined": len(rows) < 2 * P, "features": name}


def _varpro_lm(params: torch.Tensor, design, Y: torch.Tensor, iters: int, max_step: float):
    """Levenberg–Marquardt on per-channel nonlinear parameters of Y ≈ D(params) · coef, coef eliminated by least
    squares (variable projection).  params [P, q]; design(params) -> (D, dF) with D's first P columns depending
    on their channel's params only and dF [n, P, q] their derivatives.  Kaufman's Jacobian: the block for
    param (a, j) is (P⊥ dF[:, j, a]) ⊗ W_j, P⊥ the projector off span(D).  Steps are clipped to `max_step`."""
    P, q = params.shape
    k = Y.shape[1]

    def solve(p):
        D, dF = design(p)
        sol = _lstsq(D, torch.cat([Y, dF.reshape(len(Y), P * q)], 1))
        coef = sol[:, :k]
        R = Y - D @ coef
        Q = (dF.reshape(len(Y), P * q) - D @ sol[:, k:]).reshape(len(Y), P, q)
        return coef, R, Q, float((R * R).sum())

    coef, R, Q, loss = solve(params)
    mu, steps = 1e-3, 0
    for _ in range(iters):
        Wr = coef[:P]
        RW = R @ Wr.T  # [n, P]
        Qf = Q.permute(0, 2, 1).reshape(len(Y), q * P)  # columns (a, j), a-major
        g = (Qf * RW.repeat(1, q)).sum(0)
        H = (Qf.T @ Qf) * (Wr @ Wr.T).repeat(q, q)
        diag = torch.diagonal(H).clamp_min(1e-300)
        improved = False
        for _ in range(20):
            step = torch.linalg.solve(H + mu * torch.diag(diag), g).reshape(q, P).T
            big = float(step.abs().max())
            if big > max_step:  # trust region: full Gauss–Newton steps jump into the activation's flat tails
                step = step * (max_step / big)
            cand = solve(params + step)
            if cand[3] < loss:
                params = params + step
                coef, R, Q, new_loss = cand
                improved, mu = True, max(mu / 3.0, 1e-12)
                break
            mu *= 4.0
        if not improved:
            break
        steps += 1
        done = loss - new_loss <= 1e-12 * loss
        loss = new_loss
        if done:
            break
    return params, coef, R, steps


def _sweep(act: str, ht, Y, m, sigma, grid, basis: torch.Tensor, tied: bool, sweeps: int = 2,
           candidates: int = 3, coarse_every: int = 4, refine: int = 3, local: int = 11, rounds: int = 5):
    """Gauss–Seidel over channels with EXACT refit scores (Levenberg–Marquardt alone stalls in local minima).

    For channel j the other channels' columns are projected off (QR), so the score of a candidate feature is
    the full least-squares refit loss.  Candidates: the best local maxima of the 1-D gain on the fine grid of
    m_j, plus every `coarse_every`-th grid point (and both signs σ_j when `tied`), plus the current value.
    Features: act(ht_j + m_j) − σ_j ht_j (tied) or act(ht_j + m_j) (free), span(`basis`) projected out."""
    fn = torch_activation(act)
    Bp = torch.linalg.pinv(basis)

    def perp(M):
        return M - basis @ (Bp @ M)

    def feats(j, ms, ss):
        f = fn(ht[:, j:j + 1] + ms[None, :])
        if tied:
            f = f - ss[None, :] * ht[:, j:j + 1]
        return perp(f)

    P = len(m)
    m, sigma = m.clone(), sigma.clone()
    F = perp(fn(ht + m) - (sigma * ht if tied else 0.0))
    Yp = perp(Y)
    signs = (0.0, 1.0) if tied else (0.0,)
    coarse = torch.arange(0, len(grid), coarse_every)
    step = float(grid[1] - grid[0])
    for _ in range(sweeps):
        for j in range(P):
            others = torch.cat([F[:, :j], F[:, j + 1:]], 1)
            Qo, _ = torch.linalg.qr(others)
            Rt = Yp - Qo @ (Qo.T @ Yp)  # residual of the best fit without channel j
            cols, vals = [F[:, j:j + 1]], [(float(m[j]), float(sigma[j]))]
            for sg in signs:
                C = feats(j, grid, torch.full_like(grid, sg))
                pr = C.T @ Rt
                gain = (pr * pr).sum(1) / (C * C).sum(0).clamp_min(1e-300)
                padded = torch.nn.functional.pad(gain, (1, 1), value=-1.0)
                peaks = torch.nonzero((gain >= padded[:-2]) & (gain >= padded[2:])).flatten()
                peaks = peaks[torch.argsort(gain[peaks], descending=True)[:candidates]]
                pick = torch.cat([peaks, coarse])
                cols.append(C[:, pick])
                vals += [(float(grid[k]), sg) for k in pick.tolist()]
            Call = torch.cat(cols, 1)

            def exact(Cm):
                Ct = Cm - Qo @ (Qo.T @ Cm)
                pr = Ct.T @ Rt
                return (pr * pr).sum(1) / (Ct * Ct).sum(0).clamp_min(1e-300)

            score = exact(Call)
            # refine the best few candidates by nested local grids on the exact score: a grid point a fraction
            # of a step off the right value can score below a polished wrong one
            best_score, best_val, best_col = float(score[0]), vals[0], Call[:, 0]
            for k in torch.argsort(score, descending=True)[:refine].tolist():
                mv, sg = vals[k]
                sgt = torch.full((local,), sg, dtype=torch.float64)
                width = step
                for _ in range(rounds):
                    pts = mv + torch.linspace(-width, width, local, dtype=torch.float64)
                    cols_k = feats(j, pts, sgt)
                    sc = exact(cols_k)
                    bi = int(torch.argmax(sc))
                    mv = float(pts[bi])
                    width *= 2.0 / (local - 1)
                if float(sc[bi]) > best_score * (1 + 1e-12):
                    best_score, best_val, best_col = float(sc[bi]), (mv, sg), cols_k[:, bi]
            F[:, j] = best_col
            m[j], sigma[j] = best_val
    return m, sigma


def recover_plain(mlp, act: str, x: torch.Tensor, iters: int = 100, max_step: float = 0.3,
                  grid: tuple = (-8.0, 8.0, 161), sweeps: int = 2) -> tuple[RecoveredLayer, dict]:
    P = mlp.protected
    G = mlp.gate.weight.detach().double()
    z0, h = mlp.z0.detach().double(), mlp.h.detach().double()
    t = (x @ G.T - z0) / h
    d = x.shape[1]
    rows, inside = _select_rows(t, need=int(math.ceil(2.5 * (P + d + 1))))
    Y = _block_output(mlp, x[rows].to(mlp.theta.dtype))
    xr = x[rows]
    ht = t[rows] * h  # = s (a − mid) = G x − z0
    ones = torch.ones(len(rows), 1, dtype=torch.float64)

    # stage 1: sign terms absorbed into a free affine map A x + const; m by Levenberg–Marquardt from 0,
    # then a global per-channel grid sweep, then Levenberg–Marquardt again
    def free_design(p):
        F, dF = act_and_derivative(act, ht + p[:, 0])
        return torch.cat([F, xr, ones], 1), dF[..., None]

    p1, _, _, steps1 = _varpro_lm(torch.zeros(P, 1, dtype=torch.float64), free_design, Y, iters, max_step)
    grid_t = torch.linspace(*grid, dtype=torch.float64)
    affine = torch.cat([xr, ones], 1)
    m, _ = _sweep(act, ht, Y, p1[:, 0], torch.zeros(P, dtype=torch.float64), grid_t, affine, False, sweeps)
    p1, coef, _, steps2 = _varpro_lm(m[:, None], free_design, Y, iters, max_step)
    m = p1[:, 0]
    W, A = coef[:P], coef[P:P + d].T  # W rows [P, d]; A [d_out, d_in]

    # stage 2: A = −Σ_j σ_j W_j G_jᵀ (σ_j = [s_j = −1]) is linear in σ; identifiable only on the span of the
    # inputs (LayerNorm outputs lie on a hyperplane), so project there and solve least squares
    _, sv, vh = torch.linalg.svd(xr - xr.mean(0), full_matrices=False)
    basis = vh[sv > sv[0] * 1e-7]
    Gp = G @ basis.T @ basis
    sigma_real = torch.linalg.pinv((W @ W.T) * (Gp @ Gp.T), hermitian=True) @ (-((W @ A) * Gp).sum(1))
    sigma = (sigma_real > 0.5).double()

    # stage 3: the sign terms tied to their channel, W_j (act(ht_j + m_j) − σ_j ht_j): the first-order terms
    # now pin m_j too (the free model sees m_j only through curvature); sweep over (m_j, σ_j), then polish m
    m, sigma = _sweep(act, ht, Y, m, sigma, grid_t, ones, True, sweeps)

    def tied_design(p):
        F, dF = act_and_derivative(act, ht + p[:, 0])
        return torch.cat([F - sigma * ht, ones], 1), dF[..., None]

    p3, coef, R, steps3 = _varpro_lm(m[:, None], tied_design, Y, iters, max_step)
    m = p3[:, 0]
    W, const = coef[:P], coef[P]
    sign = 1.0 - 2.0 * sigma  # σ = 1 ⇔ s = −1
    mid = sign * m
    b = mid - sign * z0
    c = const + (sigma[:, None] * W * m[:, None]).sum(0)
    resid = R.norm() / Y.norm().clamp_min(1e-300)
    rec = RecoveredLayer(V=sign[:, None] * G, b=b, U=None, W=W.T.contiguous(), c=c)
    return rec, {"rows": len(rows), "rows_inside": inside, "fit_residual": float(resid), "sign": sign,
                 "lm_steps": steps1 + steps2 + steps3, "underdetermined": len(rows) < P + d + 1,
                 "sign_margin": float((sigma_real - 0.5).abs().min()) if P else 0.0}


@register_attack(NAME)
def run(ctx: AuditContext, iters: int = 100, max_step: float = 0.3, features: str = "best") -> dict:
    timer = Timer()
    inputs = ctx.layer_inputs()
    recovered, infos = {}, {}
    with timer:
        for i, mlp in ctx.layers:
            if mlp.protected == 0:
                continue
            x = inputs[i].double()
            mlp = one_piece_per_channel(mlp)
            if mlp.family == "gated":
                rec, info = recover_gated(mlp, ctx.act, x, features=features)
            else:
                rec, info = recover_plain(mlp, ctx.act, x, iters=iters, max_step=max_step)
            recovered[i], infos[i] = rec, info
        attacker = rebuild_model(ctx.release, recovered)
    inside = sum(v["rows_inside"] for v in infos.values())
    total = sum(len(inputs[i]) for i in infos)
    out = {
        "relative_weight_error": None,
        "wall_time_s": timer.elapsed + ctx.capture_time,
        "query_tokens": int(len(next(iter(inputs.values())))) if inputs else 0,
        "rows_used_per_layer_max": int(max((v["rows"] for v in infos.values()), default=0)),
        "rows_inside_share": inside / max(total, 1),
        "underdetermined_layers": [i for i, v in infos.items() if v["underdetermined"]],
        "fit_residual_max": float(max(v["fit_residual"] for v in infos.values())) if infos else 0.0,
        "features": sorted({v.get("features", "activation") for v in infos.values()}),
    }
    score = ctx.score_weights(recovered)
    if score is not None:
        out.update(score)
        out["sign_accuracy"] = ctx.sign_accuracy({i: info["sign"] for i, info in infos.items()})
    return ctx.conclude(NAME, attacker, out)
