"""Series coefficients against mpmath (independent arbitrary-precision reference)."""

import mpmath as mp
import numpy as np
import pytest
from numpy.polynomial import chebyshev as C
from numpy.polynomial import polynomial as Poly

from taylormlp import runtime

from taylormlp.maths import series

mp.mp.dps = 50
REFERENCE = {
    "silu": lambda z: z / (1 + mp.exp(-z)),
    "gelu": lambda z: z * mp.erfc(-z / mp.sqrt(2)) / 2,
    "gelu_pytorch_tanh": lambda z: z / (1 + mp.exp(-2 * mp.sqrt(2 / mp.pi) * (z + mp.mpf("0.044715") * z ** 3))),
}
POINTS = [-9.7, -3.0, -1.1, -0.2, 0.37, 2.5, 6.1]


@pytest.mark.parametrize("name", list(REFERENCE))
def test_taylor_coefficients_match_mpmath(name):
    order = 32
    got = series.taylor_coefficients(name, np.array(POINTS), order)
    for i, a in enumerate(POINTS):
        ref = np.array([float(c) for c in mp.taylor(REFERENCE[name], mp.mpf(a), order)])
        rel = np.abs(got[i] - ref) / np.maximum(np.abs(ref), 1e-300)  # exact zeros must be exact
        assert rel.max() < 1e-10, (name, a, int(rel.argmax()), rel.max())


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_new"])
def test_order_zero_is_the_activation(name):
    z = np.linspace(-50, 50, 101)
    np.testing.assert_allclose(series.taylor_coefficients(name, z, 0)[:, 0], series.activation(name, z),
                               rtol=1e-14, atol=1e-300)


def test_extreme_points_stay_finite():
    z = np.array([-1e4, -700.0, 700.0, 1e4])
    for name in REFERENCE:
        c = series.taylor_coefficients(name, z, 32)
        assert np.all(np.isfinite(c))


def test_chebyshev_interpolant_converges():
    lo, hi = np.array([-6.0]), np.array([3.0])
    t = np.linspace(-1, 1, 201)
    exact = series.activation("silu", -1.5 + 4.5 * t)
    errors = [np.abs(C.chebval(t, series.chebyshev_coefficients("silu", lo, hi, n)[0]) - exact).max()
              for n in (4, 8, 16)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-4  # SiLU's poles at ±iπ bound the rate on this wide interval


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="not supported"):
        series.taylor_coefficients("relu", np.array([0.0]), 4)
    with pytest.raises(ValueError, match="order"):
        series.taylor_coefficients("silu", np.array([0.0]), series.MAX_ORDER + 1)
    with pytest.raises(ValueError, match="finite"):
        series.taylor_coefficients("silu", np.array([np.nan]), 4)


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_new"])
def test_chebyshev_fit_has_the_activations_value_and_slope_at_both_ends(name):
    lo, hi = np.array([-6.0, -0.4, 1.0]), np.array([3.0, 0.9, 7.5])
    c = series.chebyshev_coefficients(name, lo, hi, 8)
    half = (hi - lo) / 2
    for k, end in enumerate((lo, hi)):
        t = np.array([-1.0, 1.0])[k]
        np.testing.assert_allclose(C.chebval(t, c.T), series.activation(name, end), rtol=1e-9, atol=1e-12)
        slope = C.chebval(t, C.chebder(c.T))  # dp/dt
        ref = np.array([float(mp.diff(REFERENCE["gelu_pytorch_tanh" if name == "gelu_new" else name], e))
                        for e in end]) * half
        np.testing.assert_allclose(slope, ref, rtol=1e-8, atol=1e-12)


def test_tangent_continuation_beats_plain_interpolation_outside():
    """The point of the tangent ends: the runtime's first-order continuation past the interval is accurate."""
    lo, hi = np.array([-4.65]), np.array([2.18])
    t_out = np.linspace(1.05, 1.6, 12)
    exact = series.activation("silu", (lo + hi) / 2 + (hi - lo) / 2 * t_out)
    errs = []
    for tangent in (False, True):
        c = series.chebyshev_coefficients("silu", lo, hi, 8, tangent_ends=tangent)
        errs.append(np.abs(series.runtime_values("chebyshev", c, t_out)[0] - exact).max())
    assert errs[1] < errs[0] / 2, errs


@pytest.mark.parametrize("basis", ["taylor", "chebyshev"])
def test_trust_radius_and_rescaling_keep_the_same_polynomial(basis):
    lo, hi = np.array([-0.3, -3.0, 1.0]), np.array([0.4, 2.0, 5.0])
    c = series.series_coefficients(basis, "silu", lo, hi, 8)
    tol = 1e-3
    radius = series.trust_radius(basis, "silu", lo, hi, c, tol)
    assert np.all(radius >= 1.0) and radius[0] > 1.5  # a narrow channel's Taylor series holds well past its range
    for j, r in enumerate(radius):  # inside the radius the series is within the tolerance (or its in-range error)
        t = np.linspace(-r, r, 201)
        err = series.series_error(basis, "silu", lo[j:j + 1], hi[j:j + 1], c[j:j + 1], t).max()
        in_range = series.series_error(basis, "silu", lo[j:j + 1], hi[j:j + 1], c[j:j + 1], np.linspace(-1, 1, 201))
        assert err <= max(tol, in_range.max()) * 1.01
    scaled = series.rescale_coefficients(basis, c, radius)
    s = np.linspace(-1, 1, 9)
    for j, r in enumerate(radius):
        np.testing.assert_allclose(scaled[j] @ series.basis_values(basis, s, 8).T,
                                   c[j] @ series.basis_values(basis, s * r, 8).T, rtol=1e-10, atol=1e-12)


def test_runtime_values_continue_linearly_outside():
    c = series.series_coefficients("chebyshev", "silu", np.array([-2.0]), np.array([1.0]), 8)
    v = series.runtime_values("chebyshev", c, np.array([1.0, 2.0, 3.0, -1.0, -2.0, -3.0]))[0]
    assert np.isclose(v[2] - v[1], v[1] - v[0]) and np.isclose(v[5] - v[4], v[4] - v[3])


@pytest.mark.parametrize("basis", ["taylor", "chebyshev"])
def test_edge_slopes_are_the_basis_derivatives_at_both_ends(basis):
    der, val = (C.chebder, C.chebval) if basis == "chebyshev" else (Poly.polyder, Poly.polyval)
    for order in range(20):
        eye = np.eye(order + 1)
        want = [[val(end, der(eye[n])) for n in range(order + 1)] for end in (1.0, -1.0)]
        np.testing.assert_array_equal(np.array(runtime.edge_slopes(basis, order)), np.array(want))
    with pytest.raises(ValueError, match="unknown basis"):
        runtime.edge_slopes("legendre", 4)


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_new"])
def test_runtime_continuation_is_the_activations_tangent(name):
    """Tangent-end Chebyshev coefficients: what the runtime evaluates past either end of the interval is the
    activation's tangent line there (mpmath value and derivative)."""
    lo, hi = np.array([-3.0, 0.5]), np.array([1.5, 4.0])
    c = series.chebyshev_coefficients(name, lo, hi, 10)
    half = (hi - lo) / 2
    f = REFERENCE["gelu_pytorch_tanh" if name == "gelu_new" else name]
    delta = np.array([0.25, 2.0])
    for side, end in ((1.0, hi), (-1.0, lo)):
        got = series.runtime_values("chebyshev", c, side * (1.0 + delta))  # [channels, points]
        for j, e in enumerate(end):
            e = mp.mpf(e)
            want = [float(f(e) + mp.diff(f, e) * side * d * half[j]) for d in delta]
            np.testing.assert_allclose(got[j], want, rtol=1e-8, atol=1e-10)
