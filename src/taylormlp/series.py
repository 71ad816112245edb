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

import math

import numpy as np
from numpy.polynomial import chebyshev as C

MAX_ORDER = 96

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


def chebyshev_coefficients(name: str, lo, hi, order: int) -> np.ndarray:
    """c_n with act(mid + half·t) ≈ Σ c_n T_n(t) on t ∈ [-1, 1]; shape lo.shape + (order+1,)."""
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    if not 0 <= order <= MAX_ORDER:
        raise ValueError(f"order must be in 0..{MAX_ORDER}, got {order}")
    nodes = C.chebpts1(order + 1)  # Chebyshev points of the first kind in [-1, 1]
    vander = C.chebvander(nodes, order)  # [nodes, order+1]
    mid, half = (lo + hi) / 2.0, (hi - lo) / 2.0
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
