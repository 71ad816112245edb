"""Series coefficients of the MLP activations, in float64.

Two bases, both over the normalised variable ``t = (z - z0) / h`` (``h`` = half width of the channel's
calibrated interval), so every basis function stays in [-1, 1] on the interval:

* ``taylor``:    act(z0 + h t) = Σ_n  act⁽ⁿ⁾(z0) / n! · hⁿ · tⁿ       (the paper's expansion)
* ``chebyshev``: act(z0 + h t) ≈ Σ_n  c_n · T_n(t)                    (near-minimax interpolant on [-1, 1])

Taylor coefficients act⁽ⁿ⁾(a)/n! are computed exactly (to float64 rounding) with truncated power-series
arithmetic — the same recurrences as Taylor-mode automatic differentiation — for every real ``a``:

* silu(z)      = z · σ(z)
* gelu(z)      = z · Φ(z),  Φ⁽ⁿ⁾ from the probabilists' Hermite recurrence
* gelu_tanh(z) = z · σ(2k(z + 0.044715 z³)),  k = √(2/π)   (``gelu_pytorch_tanh`` / ``gelu_new``)

σ of a series is evaluated as 1/(1 + e^{-U}) or e^{U}/(1 + e^{U}), whichever keeps e^{±U₀} ≤ 1, so no
input overflows.  Chebyshev coefficients come from ``numpy.polynomial.chebyshev`` (interpolation at
Chebyshev points of the first kind), batched over channels.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from numpy.polynomial import chebyshev as C

from .. import runtime
from ..common.choices import MAX_ORDER  # defined in choices.py, where the CLI reads its --order limit

# transformers' activation names -> our canonical names
ACTIVATION_ALIASES = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": None,  # different polynomial constant; refused explicitly below
}
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_CUBIC = 0.044715


def canonical_activation(name: str) -> str:
    canon = ACTIVATION_ALIASES.get(name)
    if canon is None:
        raise ValueError(
            f"activation {name!r} is not supported; supported: silu/swish, gelu (erf), gelu_pytorch_tanh/gelu_new"
        )
    return canon


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    """Φ(x) = erfc(-x/√2)/2, accurate in both tails (no 1 + erf cancellation)."""
    return 0.5 * np.vectorize(math.erfc, otypes=[np.float64])(-np.asarray(x, dtype=np.float64) / math.sqrt(2.0))


def activation(name: str, z) -> np.ndarray:
    """The activation itself in float64 (reference for fits and tests)."""
    name = canonical_activation(name)
    z = np.asarray(z, dtype=np.float64)
    if name == "silu":
        return z * _sigmoid(z)
    if name == "gelu":
        return z * _normal_cdf(z)
    u = 2.0 * _SQRT_2_OVER_PI * (z + _GELU_TANH_CUBIC * z**3)
    return z * _sigmoid(u)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


# ---------------------------------------------------------------- truncated power series, last axis = order


def _mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    K = a.shape[-1]
    out = np.zeros(np.broadcast_shapes(a.shape, b.shape), dtype=np.float64)
    for n in range(K):
        out[..., n] = np.einsum("...k,...k->...", a[..., : n + 1], b[..., n::-1])
    return out


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    K = num.shape[-1]
    q = np.zeros(np.broadcast_shapes(num.shape, den.shape), dtype=np.float64)
    for n in range(K):
        acc = num[..., n] - np.einsum("...k,...k->...", q[..., :n], den[..., n:0:-1])
        q[..., n] = acc / den[..., 0]
    return q


def _exp_zero_const(u: np.ndarray) -> np.ndarray:
    """exp(U) for a series with U₀ = 0:  n·E_n = Σ_{k=1..n} k·U_k·E_{n-k}."""
    K = u.shape[-1]
    e = np.zeros_like(u)
    e[..., 0] = 1.0
    k = np.arange(K, dtype=np.float64)
    for n in range(1, K):
        e[..., n] = np.einsum("...k,...k->...", k[1 : n + 1] * u[..., 1 : n + 1], e[..., n - 1 :: -1]) / n
    return e


def _sigmoid_series(u: np.ndarray) -> np.ndarray:
    """σ(U) as a series, overflow-free for any U₀."""
    u0 = u[..., :1]
    sign = np.where(u0 >= 0, -1.0, 1.0)  # use e^{sign·U} with sign·U₀ ≤ 0
    small = np.exp(sign * u0) * _exp_zero_const(sign * (u - np.concatenate([u0, np.zeros_like(u[..., 1:])], -1)))
    one = np.zeros_like(u)
    one[..., 0] = 1.0
    den = one + small
    num = np.where(sign < 0, one, small)  # 1/(1+e^{-U})  or  e^{U}/(1+e^{U})
    return _div(num, den)


def _identity_series(a: np.ndarray, K: int) -> np.ndarray:
    z = np.zeros(a.shape + (K,), dtype=np.float64)
    z[..., 0] = a
    if K > 1:
        z[..., 1] = 1.0
    return z


def taylor_coefficients(name: str, a, order: int) -> np.ndarray:
    """act⁽ⁿ⁾(a)/n! for n = 0..order, shape a.shape + (order+1,), float64."""
    name = canonical_activation(name)
    if not 0 <= order <= MAX_ORDER:
        raise ValueError(f"order must be in 0..{MAX_ORDER}, got {order}")
    a = np.asarray(a, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError("expansion points must be finite")
    K = order + 1
    z = _identity_series(a, K)
    if name == "silu":
        g = _sigmoid_series(z)
    elif name == "gelu_tanh":
        g = _sigmoid_series(2.0 * _SQRT_2_OVER_PI * (z + _GELU_TANH_CUBIC * _mul(_mul(z, z), z)))
    else:  # gelu: Φ(a+Δ) = Φ(a) + Σ_{n≥1} φ⁽ⁿ⁻¹⁾(a)/n! Δⁿ,  φ⁽ᵐ⁾ = (-1)ᵐ He_m φ
        g = np.zeros(a.shape + (K,), dtype=np.float64)
        g[..., 0] = _normal_cdf(a)
        phi = np.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
        # h_m = He_m(a) / m!  via  He_{m+1} = a He_m - m He_{m-1}
        h_prev, h = np.zeros_like(a), np.ones_like(a)
        for n in range(1, K):
            m = n - 1
            g[..., n] = (-1.0) ** m * h * phi / n
            h_prev, h = h, (a * h - h_prev) / (m + 1)
    return _mul(z, g)


def activation_slope(name: str, z) -> np.ndarray:
    """act'(z) in float64 (the order-1 Taylor coefficient)."""
    return taylor_coefficients(name, z, 1)[..., 1]


@functools.lru_cache(maxsize=16)
def _tangent_fit_operator(order: int, points: int) -> np.ndarray:
    """Linear map [f(t_g) (G values), f(-1), f(1), f'(-1), f'(1)] -> Chebyshev coefficients c_0..c_N that
    minimise Σ_g (p(t_g) - f(t_g))² over Chebyshev points t_g subject to p = f and p' = f' at t = ±1
    (a Lagrange / KKT system, solved once per order)."""
    t = C.chebpts1(points)
    A = C.chebvander(t, order)  # [G, N+1]
    ends = np.array([-1.0, 1.0])
    V = C.chebvander(ends, order)  # p(±1)
    D = np.zeros((2, order + 1))  # p'(±1)
    for n in range(1, order + 1):
        D[:, n] = C.chebval(ends, C.chebder(np.eye(order + 1)[n]))
    B = np.vstack([V, D])  # [4, N+1]
    K = np.block([[2.0 * A.T @ A, B.T], [B, np.zeros((4, 4))]])
    rhs = np.block([[2.0 * A.T, np.zeros((order + 1, 4))], [np.zeros((4, points)), np.eye(4)]])
    return np.linalg.solve(K, rhs)[: order + 1]  # [N+1, G+4]


def chebyshev_coefficients(name: str, lo, hi, order: int, tangent_ends: bool = True) -> np.ndarray:
    """c_n with act(mid + half·t) ≈ Σ c_n T_n(t) on t ∈ [-1, 1]; shape lo.shape + (order+1,).

    tangent_ends (default, order >= 3): near-minimax least squares on Chebyshev points, constrained so that
    value AND slope equal the activation's at both ends of the interval.  Then the runtime's first-order
    continuation outside the interval is the activation's own tangent line there, accurate to second order
    in the excursion, instead of inheriting the interpolant's edge slope error (about N² times its value
    error).  Otherwise: interpolation at Chebyshev points of the first kind."""
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    if not 0 <= order <= MAX_ORDER:
        raise ValueError(f"order must be in 0..{MAX_ORDER}, got {order}")
    mid, half = (lo + hi) / 2.0, (hi - lo) / 2.0
    if tangent_ends and order >= 3:
        points = max(4 * (order + 1), 64)
        nodes = C.chebpts1(points)
        ends = np.stack([lo, hi], -1)
        samples = np.concatenate([activation(name, mid[..., None] + half[..., None] * nodes), activation(name, ends),
                                  activation_slope(name, ends) * half[..., None]], -1)  # dp/dt = h · act'
        return samples @ _tangent_fit_operator(order, points).T
    nodes = C.chebpts1(order + 1)  # Chebyshev points of the first kind in [-1, 1]
    vander = C.chebvander(nodes, order)  # [nodes, order+1]
    values = activation(name, mid[..., None] + half[..., None] * nodes)  # [..., nodes]
    coef = np.linalg.solve(vander, values.reshape(-1, order + 1).T).T
    return coef.reshape(lo.shape + (order + 1,))


def basis_values(basis: str, t: np.ndarray, order: int) -> np.ndarray:
    """Basis functions at t (float64 reference; the torch runtime uses the same recurrences)."""
    t = np.asarray(t, dtype=np.float64)
    if basis == "taylor":
        return np.stack([t**n for n in range(order + 1)], -1)
    if basis == "chebyshev":
        return C.chebvander(t, order)
    raise ValueError(f"unknown basis {basis!r}; choose taylor or chebyshev")


def series_coefficients(basis: str, act: str, lo, hi, order: int) -> np.ndarray:
    """Coefficients over t = (z - mid)/half for a channel calibrated to [lo, hi] (activation coordinates)."""
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    if basis == "taylor":
        mid, half = (lo + hi) / 2.0, (hi - lo) / 2.0
        return taylor_coefficients(act, mid, order) * half[..., None] ** np.arange(order + 1)
    if basis == "chebyshev":
        return chebyshev_coefficients(act, lo, hi, order)
    raise ValueError(f"unknown basis {basis!r}; choose taylor or chebyshev")


# ---------------------------------------------------------------- trust radius: how far a series stays accurate


def series_error(basis: str, act: str, lo, hi, coeffs: np.ndarray, t: np.ndarray) -> np.ndarray:
    """|Σ c_n φ_n(t) - act(mid + half·t)| per channel at the points t (any real t, not only [-1, 1])."""
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    phi = basis_values(basis, t, coeffs.shape[-1] - 1)  # [points, N+1]
    approx = coeffs @ phi.T  # [I, points]
    mid, half = (lo + hi) / 2.0, (hi - lo) / 2.0
    exact = activation(act, mid[:, None] + half[:, None] * np.asarray(t)[None, :])
    err = np.abs(approx - exact)
    return np.where(np.isfinite(err), err, np.inf)


def trust_radius(basis: str, act: str, lo, hi, coeffs: np.ndarray, tolerance: np.ndarray | float,
                 r_max: float = 4.0, step: float = 0.05) -> np.ndarray:
    """Per channel, the largest R in [1, r_max] such that the series stays within `tolerance` of the activation
    for every |t| <= R (checked on a grid of both sides).  A series is usually accurate a good way past the
    calibrated interval (a Taylor series up to its radius of convergence); the runtime's clamp should sit there,
    not at the edge of the calibration data."""
    grid = np.arange(1.0 + step, r_max + step / 2, step)
    grid = grid[grid <= r_max * (1 + 1e-12)]  # arange may overshoot r_max when (r_max - 1) / step is not whole
    if grid.size == 0:
        return np.ones(np.shape(lo))
    t = np.concatenate([grid, -grid])
    err = series_error(basis, act, lo, hi, coeffs, t)  # [I, 2G]
    bad = np.maximum(err[:, : grid.size], err[:, grid.size:]) > np.asarray(tolerance, dtype=np.float64).reshape(-1, 1)
    # index of the first grid point that fails (G if none)
    first_bad = np.where(bad.any(-1), bad.argmax(-1), grid.size)
    return np.concatenate([[1.0], grid])[first_bad]


def rescale_coefficients(basis: str, coeffs: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Coefficients of the same polynomials over s = t / R:  p(t) = Σ c_n φ_n(t) = Σ c'_n φ_n(s)."""
    order = coeffs.shape[-1] - 1
    powers = np.asarray(radius, dtype=np.float64)[..., None] ** np.arange(order + 1)
    if basis == "taylor":
        return coeffs * powers
    if basis == "chebyshev":  # Chebyshev -> monomials, scale t = R s, monomials -> Chebyshev
        eye = np.eye(order + 1)
        to_poly = np.stack([np.pad(C.cheb2poly(row), (0, order + 1 - len(C.cheb2poly(row)))) for row in eye])
        to_cheb = np.stack([np.pad(C.poly2cheb(row), (0, order + 1 - len(C.poly2cheb(row)))) for row in eye])
        return ((coeffs @ to_poly) * powers) @ to_cheb
    raise ValueError(f"unknown basis {basis!r}; choose taylor or chebyshev")


def runtime_values(basis: str, coeffs: np.ndarray, t: np.ndarray) -> np.ndarray:
    """What the runtime evaluates at t (float64): the series on [-1, 1], and outside it the first-order continuation
    p(t_c) + p'(t_c)(t - t_c) from the clamped point t_c — ``series_values`` itself.  coeffs [..., N+1],
    t [points]; returns [..., points]."""
    c = torch.as_tensor(np.asarray(coeffs, dtype=np.float64))[..., None, :]
    return series_values(basis, c, torch.as_tensor(np.asarray(t, dtype=np.float64))).numpy()


def series_slopes(basis: str, coeffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p'(+1) and p'(−1) of p = Σ_n c_n φ_n for coefficients ``coeffs`` [..., N+1] (order last), in their dtype."""
    plus, minus = (torch.tensor(s, dtype=coeffs.dtype, device=coeffs.device)
                   for s in runtime.edge_slopes(basis, coeffs.shape[-1] - 1))
    return coeffs @ plus, coeffs @ minus


def series_values(basis: str, coeffs: torch.Tensor, t: torch.Tensor, slopes=None) -> torch.Tensor:
    """Σ_n c_n φ_n(t) as the runtime (TaylorMLP.forward) evaluates it, in closed form: NaN counts as 0, t is clamped to t_c ∈ [-1, 1], and past ±1 the
    value continues linearly with the edge slope, p(t_c) + p'(t_c)·(t − t_c).  ``coeffs`` [..., N+1] has the order
    last, ``coeffs[..., n]`` broadcasting against t; one pass of Horner (power basis) or Clenshaw (Chebyshev), no
    basis tensor.  ``slopes``: ``series_slopes(basis, coeffs)``, for a caller that keeps them."""
    if basis not in runtime.BASES:
        raise ValueError(f"unknown basis {basis!r}; choose one of {runtime.BASES}")
    t = torch.nan_to_num(t, nan=0.0)
    tc = t.clamp(-1.0, 1.0)
    N = coeffs.shape[-1] - 1
    if basis == "taylor":  # Horner
        p = coeffs[..., N]
        for n in range(N - 1, -1, -1):
            p = p * tc + coeffs[..., n]
    else:  # Clenshaw: b_n = 2t b_{n+1} − b_{n+2} + c_n,  p = t b_1 − b_2 + c_0
        two_t = 2.0 * tc
        b1 = torch.zeros_like(tc)
        b2 = torch.zeros_like(tc)
        for n in range(N, 0, -1):
            b1, b2 = two_t * b1 - b2 + coeffs[..., n], b1
        p = tc * b1 - b2 + coeffs[..., 0]
    plus, minus = series_slopes(basis, coeffs) if slopes is None else slopes
    return p + (t - tc) * torch.where(t > 0, plus, minus)
