"""Series coefficients against mpmath (independent arbitrary-precision reference)."""

import mpmath as mp
import numpy as np
import pytest
from numpy.polynomial import chebyshev as C

from taylormlp import series

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
