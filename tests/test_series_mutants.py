"""series.py's contracts that `make mutate` found untested (each test names the mutants it kills).

References are independent of the code under test: mpmath, numpy.polynomial, torch's activations, the closed forms
of the bases, a null-space least-squares solve, and brute force; never numbers produced by series.py itself.  Where a
test compares series.py with itself (float32 input vs the same values in float64, a batch vs its rows), the contract
is that equality, and the float64 path is checked against mpmath in test_series.py."""

import math

import mpmath as mp
import numpy as np
import pytest
import torch
from numpy.polynomial import chebyshev as C
from numpy.polynomial import polynomial as P

from taylormlp.maths import series

ACTS = ["silu", "gelu", "gelu_pytorch_tanh"]
BASES = ["taylor", "chebyshev"]
MP = {  # 30 digits are plenty for float64 comparisons and keep these tests fast
    "silu": lambda z: z / (1 + mp.exp(-z)),
    "gelu": lambda z: z * mp.erfc(-z / mp.sqrt(2)) / 2,
    "gelu_pytorch_tanh": lambda z: z / (1 + mp.exp(-2 * mp.sqrt(2 / mp.pi) * (z + mp.mpf("0.044715") * z ** 3))),
}
TORCH = {
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_pytorch_tanh": lambda z: torch.nn.functional.gelu(z, approximate="tanh"),
}


def mp_values(name, z):
    with mp.workdps(30):
        return np.array([float(MP[name](mp.mpf(float(v)))) for v in np.ravel(z)]).reshape(np.shape(z))


def torch_act(name, z):
    return TORCH[name](torch.as_tensor(np.asarray(z, dtype=np.float64))).numpy()


def chebyshev_nodes(n):
    """Chebyshev points of the first kind, written out (not numpy's chebpts1)."""
    return np.array([math.cos((2 * k + 1) * math.pi / (2 * n)) for k in range(n)])


# ---------------------------------------------------------------- float64 whatever the input dtype


@pytest.mark.parametrize("name", ACTS)
def test_float32_inputs_are_evaluated_in_float64(name):
    """Calibration ranges may arrive as float32: every function casts first and computes in float64 (kills the
    `dtype=np.float64` -> None / dropped mutants of activation, _normal_cdf, taylor_coefficients,
    chebyshev_coefficients, series_coefficients, series_error, basis_values, rescale_coefficients, runtime_values)."""
    z32 = np.array([-7.3, -1.7, -0.3, 0.45, 2.2, 5.9], dtype=np.float32)
    z64 = z32.astype(np.float64)
    got = series.activation(name, z32)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, mp_values(name, z64), rtol=1e-13, atol=1e-300)
    np.testing.assert_array_equal(series.activation(name, [0, 1, -2]), series.activation(name, [0.0, 1.0, -2.0]))
    np.testing.assert_array_equal(series.taylor_coefficients(name, z32, 6), series.taylor_coefficients(name, z64, 6))
    lo32 = np.array([-3.1, -0.7, 0.3], dtype=np.float32)
    hi32 = np.array([1.3, 0.1, 2.9], dtype=np.float32)
    lo64, hi64 = lo32.astype(np.float64), hi32.astype(np.float64)
    for tangent in (True, False):
        np.testing.assert_array_equal(series.chebyshev_coefficients(name, lo32, hi32, 8, tangent_ends=tangent),
                                      series.chebyshev_coefficients(name, lo64, hi64, 8, tangent_ends=tangent))
    t = np.linspace(-2.5, 2.5, 11)
    for basis in BASES:
        c = series.series_coefficients(basis, name, lo32, hi32, 8)
        np.testing.assert_array_equal(c, series.series_coefficients(basis, name, lo64, hi64, 8))
        np.testing.assert_array_equal(series.series_error(basis, name, lo32, hi32, c, t),
                                      series.series_error(basis, name, lo64, hi64, c, t))


@pytest.mark.parametrize("basis", BASES)
def test_float32_basis_radius_and_runtime_inputs_are_evaluated_in_float64(basis):
    t32 = np.array([-0.9, -0.31, 0.17, 0.77], dtype=np.float32)
    phi = series.basis_values(basis, t32, 7)
    assert phi.dtype == np.float64
    np.testing.assert_array_equal(phi, series.basis_values(basis, t32.astype(np.float64), 7))
    c = series.series_coefficients(basis, "silu", np.array([-2.0, 0.5]), np.array([1.0, 3.0]), 8)
    r32 = np.array([1.35, 2.7], dtype=np.float32)
    np.testing.assert_array_equal(series.rescale_coefficients(basis, c, r32),
                                  series.rescale_coefficients(basis, c, r32.astype(np.float64)))
    # runtime_values is the float64 reference: float32 coefficients are widened, and t - t_c is exact even where
    # float32 cannot hold it (2^24 + 2 - 1)
    c32 = c.astype(np.float32)
    big = np.array([2.0 ** 24 + 2, -(2.0 ** 24 + 2), 0.3], dtype=np.float32)
    got = series.runtime_values(basis, c32, big)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, series.runtime_values(basis, c32.astype(np.float64), big.astype(np.float64)))


# ---------------------------------------------------------------- shapes: empty layers, scalars, batches


@pytest.mark.parametrize("name", ACTS)
def test_a_layer_without_channels_gives_empty_results(name):
    """A layer may protect no channel at all (kills the `otypes=[np.float64]` mutants: np.vectorize cannot infer an
    output type from an empty input)."""
    empty = np.array([])
    assert series.activation(name, empty).shape == (0,)
    assert series.taylor_coefficients(name, empty, 4).shape == (0, 5)
    assert series.activation_slope(name, empty).shape == (0,)
    for tangent in (True, False):
        assert series.chebyshev_coefficients(name, empty, empty, 8, tangent_ends=tangent).shape == (0, 9)
    for basis in BASES:
        c = series.series_coefficients(basis, name, empty, empty, 6)
        assert c.shape == (0, 7)
        assert series.trust_radius(basis, name, empty, empty, c, 1e-3).shape == (0,)
        assert series.runtime_values(basis, c, np.array([0.5, 2.0])).shape == (0, 2)


@pytest.mark.parametrize("name", ACTS)
def test_scalar_and_2d_expansion_points(name):
    """taylor_coefficients and chebyshev_coefficients return a.shape + (order+1,) for any a (kills `shape[-1]` ->
    `shape[+1]` in _mul, _div and _exp_zero_const, `np.stack(..., -1)` / `np.concatenate(..., -1)` -> +1 and
    `coef.reshape(lo.shape + ...)` -> reshape(None) in chebyshev_coefficients)."""
    a = np.array([[-2.2, 0.4, 1.9], [3.3, -0.6, 0.05]])
    order = 5  # != 3 columns, so a wrong axis cannot pass by accident
    got = series.taylor_coefficients(name, a, order)
    assert got.shape == (2, 3, order + 1)
    np.testing.assert_array_equal(got.reshape(6, -1), series.taylor_coefficients(name, a.ravel(), order))
    scalar = series.taylor_coefficients(name, 0.7, order)
    assert scalar.shape == (order + 1,)
    np.testing.assert_array_equal(scalar, series.taylor_coefficients(name, np.array([0.7]), order)[0])
    lo, hi = a - 1.5, a + np.array([[0.5], [2.0]])
    for tangent, n in ((True, 8), (False, 8), (True, 2)):
        c = series.chebyshev_coefficients(name, lo, hi, n, tangent_ends=tangent)
        assert c.shape == (2, 3, n + 1)
        np.testing.assert_allclose(c.reshape(6, -1),
                                   series.chebyshev_coefficients(name, lo.ravel(), hi.ravel(), n, tangent_ends=tangent),
                                   rtol=1e-13, atol=1e-15)
        c0 = series.chebyshev_coefficients(name, -1.0, 2.0, n, tangent_ends=tangent)
        assert c0.shape == (n + 1,)
        np.testing.assert_allclose(c0, series.chebyshev_coefficients(name, np.array([-1.0]), np.array([2.0]), n,
                                                                     tangent_ends=tangent)[0], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("basis", BASES)
def test_basis_values_match_their_definitions(basis):
    """φ_n(t) = tⁿ or T_n(t) = cos(n·arccos t) (cosh(n·arccosh|t|)·sign(t)ⁿ past ±1), order last, for t of any shape
    (kills `np.stack(..., -1)` -> +1)."""
    t = np.array([[-1.7, -1.0, -0.4], [0.0, 0.6, 2.3]])
    order = 6
    got = series.basis_values(basis, t, order)
    assert got.shape == (2, 3, order + 1)
    for idx in np.ndindex(t.shape):
        x = float(t[idx])
        for n in range(order + 1):
            if basis == "taylor":
                ref = x ** n
            elif abs(x) <= 1:
                ref = math.cos(n * math.acos(x))
            else:
                ref = math.cosh(n * math.acosh(abs(x))) * math.copysign(1.0, x) ** n
            assert got[idx + (n,)] == pytest.approx(ref, rel=1e-12, abs=1e-12), (idx, n)


def test_rescaling_works_on_a_batch_of_layers():
    """rescale_coefficients maps [..., N+1] coefficients with [...] radii (kills `coeffs.shape[-1]` -> shape[+1])."""
    rng = np.random.default_rng(0)
    for basis in BASES:
        c = rng.normal(size=(2, 3, 6))
        r = rng.uniform(1.0, 3.0, size=(2, 3))
        got = series.rescale_coefficients(basis, c, r)
        assert got.shape == c.shape
        s = np.linspace(-1, 1, 7)
        for i, j in np.ndindex(2, 3):
            p = P.polyval if basis == "taylor" else C.chebval
            np.testing.assert_allclose(p(s, got[i, j]), p(s * r[i, j], c[i, j]), rtol=1e-11, atol=1e-11)


# ---------------------------------------------------------------- truncated power-series arithmetic


def test_series_product_quotient_and_exponential_match_numpy_and_mpmath():
    """The three truncated power-series primitives, broadcasting either operand (kills `broadcast_shapes(a.shape,
    b.shape)` with an operand dropped, and the `shape[-1]` mutants on 3-d operands)."""
    rng = np.random.default_rng(1)
    K = 6
    many, one = rng.normal(size=(3, K)), rng.normal(size=(1, K))
    one[0, 0] = 1.7  # a unit leading term, so the quotient exists
    den_many = many.copy()
    den_many[:, 0] = [1.3, -0.8, 2.1]
    for a, b in ((many, one), (one, many)):
        got = series._mul(a, b)
        assert got.shape == (3, K)
        for i in range(3):
            ref = P.polymul(a[min(i, len(a) - 1)], b[min(i, len(b) - 1)])[:K]
            np.testing.assert_allclose(got[i], ref, rtol=1e-13, atol=1e-13)
    for num, den in ((many, one), (one, den_many)):
        q = series._div(num, den)
        assert q.shape == (3, K)
        for i in range(3):
            back = P.polymul(q[i], den[min(i, len(den) - 1)])[:K]
            np.testing.assert_allclose(back, num[min(i, len(num) - 1)], rtol=1e-12, atol=1e-12)
    cube = rng.normal(size=(2, 3, K))  # shape[1] = 3 != K: a wrong axis would truncate or fail
    cube2 = rng.normal(size=(2, 3, K))
    cube2[..., 0] = 2.0
    np.testing.assert_allclose(series._mul(cube, cube2)[1, 2], P.polymul(cube[1, 2], cube2[1, 2])[:K], rtol=1e-13,
                               atol=1e-13)
    np.testing.assert_allclose(P.polymul(series._div(cube, cube2)[0, 1], cube2[0, 1])[:K], cube[0, 1], rtol=1e-12,
                               atol=1e-12)
    u = cube.copy()
    u[..., 0] = 0.0
    e = series._exp_zero_const(u)
    assert e.shape == u.shape
    with mp.workdps(30):
        for idx in ((0, 0), (1, 2)):
            coeffs = [mp.mpf(float(x)) for x in u[idx]]
            ref = mp.taylor(lambda x: mp.exp(mp.polyval(coeffs[::-1], x)), 0, K - 1)
            np.testing.assert_allclose(e[idx], [float(r) for r in ref], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- orders: the limits and the tangent-fit switch


@pytest.mark.parametrize("name", ACTS)
def test_order_limits_are_inclusive(name):
    """Orders 0..MAX_ORDER are accepted by both fits, others refused with a message naming the range (kills `<=` ->
    `<` and `0 <=` -> `0 <` / `1 <=` in both functions, and the message dropped)."""
    a = np.array([-1.3, 0.2, 2.4])
    top = series.taylor_coefficients(name, a, series.MAX_ORDER)
    assert top.shape == (3, series.MAX_ORDER + 1) and np.isfinite(top).all()
    # a Taylor coefficient does not depend on where the series is cut
    np.testing.assert_allclose(top[:, :17], series.taylor_coefficients(name, a, 16), rtol=1e-12, atol=1e-300)
    lo, hi = np.array([-2.0, 0.5]), np.array([2.0, 1.5])
    order0 = series.chebyshev_coefficients(name, lo, hi, 0)  # the interpolant at the single node t = 0
    np.testing.assert_allclose(order0[:, 0], mp_values(name, (lo + hi) / 2), rtol=1e-14)
    c = series.chebyshev_coefficients(name, lo, hi, series.MAX_ORDER)
    assert c.shape == (2, series.MAX_ORDER + 1)
    t = np.linspace(-1, 1, 41)
    exact = torch_act(name, (lo + hi)[:, None] / 2 + (hi - lo)[:, None] / 2 * t)
    approx = C.chebval(t, c.T)
    np.testing.assert_allclose(approx, exact, rtol=0, atol=1e-12)  # needs >= N+1-4 sample points (4(N+1) = 388)
    for bad in (-1, series.MAX_ORDER + 1):
        msg = rf"^order must be in 0\.\.{series.MAX_ORDER}, got {bad}$"
        with pytest.raises(ValueError, match=msg):
            series.taylor_coefficients(name, a, bad)
        with pytest.raises(ValueError, match=msg):
            series.chebyshev_coefficients(name, lo, hi, bad)


@pytest.mark.parametrize("name", ACTS)
def test_tangent_ends_from_order_three_and_interpolation_below(name):
    """Order 3 is the lowest order with room for the four end conditions, so it already has the activation's value
    and slope at both ends (kills `order >= 3` -> `> 3` / `>= 4`); order 2 interpolates at the three nodes."""
    lo, hi = np.array([-3.0, 0.2]), np.array([1.0, 1.4])
    half = (hi - lo) / 2
    c = series.chebyshev_coefficients(name, lo, hi, 3)
    with mp.workdps(30):
        for k, end in enumerate((lo, hi)):
            t = (-1.0, 1.0)[k]
            np.testing.assert_allclose(C.chebval(t, c.T), mp_values(name, end), rtol=1e-12, atol=1e-14)
            slope = np.array([float(mp.diff(MP[name], mp.mpf(float(e)))) for e in end]) * half
            np.testing.assert_allclose(C.chebval(t, C.chebder(c.T)), slope, rtol=1e-10, atol=1e-14)
    c2 = series.chebyshev_coefficients(name, lo, hi, 2)
    nodes = chebyshev_nodes(3)
    np.testing.assert_allclose(C.chebval(nodes, c2.T),
                               mp_values(name, (lo + hi)[:, None] / 2 + half[:, None] * nodes), rtol=1e-12,
                               atol=1e-14)


@pytest.mark.parametrize("name", ACTS)
def test_plain_interpolant_interpolates_at_the_chebyshev_nodes(name):
    """tangent_ends=False: p(t_k) = act(mid + half·t_k) at the N+1 Chebyshev points of the first kind (kills
    `mid + half·nodes` -> `mid - half·nodes`, which interpolates the mirrored function)."""
    lo, hi = np.array([-4.65, -0.3, 0.8]), np.array([2.18, 0.9, 5.5])
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    for order in (1, 4, 8):
        c = series.chebyshev_coefficients(name, lo, hi, order, tangent_ends=False)
        nodes = chebyshev_nodes(order + 1)
        np.testing.assert_allclose(C.chebval(nodes, c.T), mp_values(name, mid[:, None] + half[:, None] * nodes),
                                   rtol=1e-11, atol=1e-13)


def test_tangent_fit_is_the_constrained_least_squares_fit():
    """The tangent-ends fit minimises Σ_g (p(t_g) - act(z_g))² over the Chebyshev points of the first kind subject
    to value and slope at both ends, here solved independently by the null-space method.  How many points is
    immaterial once they are enough (a Gauss-Chebyshev sum: 64 or 65 points give the same fit to rounding), so the
    sample-count mutants that keep it >= 64 are equivalent; MAX_ORDER (test_order_limits_are_inclusive) needs > N."""
    lo, hi = np.array([-12.0, -3.0]), np.array([9.0, 14.0])  # wide, so the fit error is far above rounding
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    for order in (4, 16, 20):
        got = series.chebyshev_coefficients("silu", lo, hi, order)
        t = chebyshev_nodes(max(4 * (order + 1), 64))
        A = np.array([[math.cos(n * math.acos(x)) for n in range(order + 1)] for x in t])
        B = np.array([[(-1.0) ** n for n in range(order + 1)], [1.0] * (order + 1),  # T_n(±1) = (±1)ⁿ
                      [(-1.0) ** (n + 1) * n * n for n in range(order + 1)],  # T_n'(±1) = (±1)ⁿ⁺¹ n²
                      [float(n * n) for n in range(order + 1)]])
        for j in range(2):
            f = torch_act("silu", mid[j] + half[j] * t)
            with mp.workdps(30):  # slopes in t: dp/dt = half · act'
                d = [float(mp.diff(MP["silu"], mp.mpf(float(e)))) * half[j] for e in (lo[j], hi[j])]
            rhs = np.array([torch_act("silu", lo[j]), torch_act("silu", hi[j]), d[0], d[1]], dtype=np.float64)
            c0 = np.linalg.lstsq(B, rhs, rcond=None)[0]  # one solution of the constraints ...
            null = np.linalg.svd(B)[2][4:].T  # ... plus the null space of B
            ref = c0 + null @ np.linalg.lstsq(A @ null, f - A @ c0, rcond=None)[0]
            np.testing.assert_allclose(got[j], ref, rtol=0, atol=1e-9 * np.abs(ref).max(), err_msg=f"order {order}")


# ---------------------------------------------------------------- errors, trust radius


def test_unknown_basis_messages_name_the_basis_and_the_choices():
    msg = r"^unknown basis 'legendre'; choose taylor or chebyshev$"
    with pytest.raises(ValueError, match=msg):
        series.basis_values("legendre", np.zeros(3), 4)
    with pytest.raises(ValueError, match=msg):
        series.series_coefficients("legendre", "silu", np.zeros(1), np.ones(1), 4)
    with pytest.raises(ValueError, match=msg):
        series.rescale_coefficients("legendre", np.zeros((1, 5)), np.ones(1))
    with pytest.raises(ValueError, match=r"^expansion points must be finite$"):
        series.taylor_coefficients("silu", np.array([0.0, np.inf]), 4)


def test_a_non_finite_series_error_is_infinite():
    """inf - inf in the series is NaN; series_error reports it as +inf so every tolerance rejects it (kills
    `np.where(..., np.inf)` -> None) and the trust radius stays at 1."""
    lo, hi = np.array([-1.0, -1.0]), np.array([1.0, 1.0])
    coeffs = np.array([[np.inf, -np.inf, 0.0], [1e308, 1e308, 1e308]])  # NaN at t = 1, overflow past it
    with np.errstate(over="ignore", invalid="ignore"):
        err = series.series_error("taylor", "silu", lo, hi, coeffs, np.array([1.0, 2.0]))
        radius = series.trust_radius("taylor", "silu", lo, hi, coeffs, 1e300)
    assert err.dtype == np.float64
    assert np.isposinf(err).all(), err
    np.testing.assert_array_equal(radius, [1.0, 1.0])


def _brute_force_radius(basis, act, lo, hi, coeffs, tol, r_max, step):
    """Largest R = 1 + k·step <= r_max with |p(t) - act| <= tol at every grid point ±(1 + i·step), i <= k."""
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    value = P.polyval if basis == "taylor" else C.chebval
    out = []
    for j in range(len(lo)):
        radius, k = 1.0, 1
        while 1 + k * step <= r_max + 1e-9:
            r = 1 + k * step
            ok = all(abs(value(s, coeffs[j]) - torch_act(act, mid[j] + half[j] * s)) <= tol[j] for s in (r, -r))
            if not ok:
                break
            radius, k = r, k + 1
        out.append(radius)
    return np.array(out)


@pytest.mark.parametrize("basis", BASES)
def test_trust_radius_matches_brute_force(basis):
    """trust_radius against a walk outwards over the same grid, both sides, a tolerance per channel, the default
    and other grids (kills the mutants of the default r_max / step, the grid's ends, the empty / single-point grid,
    the one-sided check (+grid) and the per-channel tolerance's reshape)."""
    lo = np.array([-0.3, -3.0, 1.0, -6.0, -1.0, -2.5])
    hi = np.array([0.4, 2.0, 5.0, -2.0, 0.2, -0.5])
    c = series.series_coefficients(basis, "silu", lo, hi, 6)
    tol = np.array([1e-5, 1.0, 1e-2, 5e-2, 1e-3, 1e-2])
    got = series.trust_radius(basis, "silu", lo, hi, c, tol)
    ref = _brute_force_radius(basis, "silu", lo, hi, c, tol, 4.0, 0.05)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    assert len(set(np.round(got, 6))) >= 3, got  # the channels do stop at different radii
    assert 1.0 < got.min() and got.max() <= 4.0
    # the negative side decides somewhere: a one-sided walk would go further
    one_sided = []
    for j in range(len(lo)):
        r = 1.0
        for s in np.arange(1.05, 4.025, 0.05):
            if abs((P.polyval if basis == "taylor" else C.chebval)(s, c[j])
                   - torch_act("silu", (lo[j] + hi[j]) / 2 + (hi[j] - lo[j]) / 2 * s)) > tol[j]:
                break
            r = s
        one_sided.append(r)
    assert (np.array(one_sided) > ref + 1e-9).any(), (one_sided, ref)
    for r_max, step in ((2.0, 0.1), (1.3, 0.3), (3.0, 0.25)):
        np.testing.assert_allclose(series.trust_radius(basis, "silu", lo, hi, c, tol, r_max=r_max, step=step),
                                   _brute_force_radius(basis, "silu", lo, hi, c, tol, r_max, step), rtol=0, atol=1e-12)
    # any tolerance: the default grid runs exactly to r_max = 4
    np.testing.assert_allclose(series.trust_radius(basis, "silu", lo, hi, c, 1e9), 4.0, rtol=0, atol=1e-12)
    # no grid point (r_max < 1 + step): radius 1 per channel
    ones = series.trust_radius(basis, "silu", lo, hi, c, tol, r_max=1.0)
    assert ones.shape == (6,)
    np.testing.assert_array_equal(ones, 1.0)


def test_tolerance_is_inclusive():
    """'within tolerance' means error <= tolerance: a series exact to the last bit is trusted with tolerance 0
    (kills `>` -> `>=`).  silu(z) = z in float64 for z > 40, so p(t) = mid + half·t is exact there."""
    lo, hi = np.array([100.0]), np.array([102.0])
    coeffs = np.array([[101.0, 1.0, 0.0, 0.0]])
    assert series.series_error("taylor", "silu", lo, hi, coeffs, np.linspace(-4, 4, 17)).max() == 0.0
    np.testing.assert_allclose(series.trust_radius("taylor", "silu", lo, hi, coeffs, 0.0), [4.0], rtol=1e-12)
    np.testing.assert_allclose(series.trust_radius("taylor", "silu", lo, hi, coeffs, 0.0, r_max=1.05), [1.05])


def test_trust_radius_never_exceeds_r_max_on_a_grid_that_does_not_divide_it():
    """r_max = 1.4 with step 0.25: the grid 1.25, 1.5 would overshoot; an exact series is trusted up to 1.4 at most."""
    lo, hi = np.array([-1.0]), np.array([1.0])
    coeffs = series.series_coefficients("taylor", "silu", lo, hi, 24)  # accurate far past the interval
    radius = series.trust_radius("taylor", "silu", lo, hi, coeffs, 1e-3, r_max=1.4, step=0.25)
    assert 1.0 <= radius[0] <= 1.4
