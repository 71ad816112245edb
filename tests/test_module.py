"""TaylorMLP block against the original MLP block, for every supported architecture."""

import numpy as np
import pytest
import torch
import transformers

from taylormlp import runtime

from taylormlp.maths import series
from taylormlp.maths.pieces import single_pieces, split_pieces
from taylormlp.protection.protector import build_taylor_mlp, mlp_weights
from taylormlp.common.errors import TaylorMLPError
from taylormlp.release.directory import load_release


def _setup(model, gate_scale, seed=0):
    """First MLP of `model`, with its gate weights rescaled so pre-activations span a few units."""
    arch = runtime.architecture(model.config)
    mlp = runtime.decoder_layers(model)[0].mlp
    gate = getattr(mlp, arch["gate"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * gate_scale / gate.weight.shape[0] ** 0.5)
        if gate.bias is not None:
            gate.bias.copy_(torch.randn(gate.bias.shape, generator=g) * 0.3)
        down = getattr(mlp, arch["down"])
        if down.bias is not None:
            down.bias.copy_(torch.randn(down.bias.shape, generator=g) * 0.1)
    x = torch.randn(4, 16, model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd,
                    generator=g).to(gate.weight.dtype)
    with torch.no_grad():
        z = gate(x).reshape(-1, gate(x).shape[-1]).double()
    lo, hi = z.min(0).values.numpy(), z.max(0).values.numpy()
    return arch, mlp, x, lo, hi


def _build(model, arch, mlp, lo, hi, order, basis, mask=None, signs=None, max_pieces=1, tolerance=1e-6):
    act = runtime.activation_name(model.config)
    w = mlp_weights(mlp, arch, 0)
    if max_pieces == 1:
        pieces = single_pieces(lo, hi, series.series_coefficients(basis, act, lo, hi, order))
    else:
        pieces, _ = split_pieces(basis, act, lo, hi, order, tolerance, max_pieces)
    mask = np.ones(len(lo), dtype=bool) if mask is None else mask
    signs = np.ones(len(lo)) if signs is None else signs
    return build_taylor_mlp(w, arch["family"], act, pieces, mask, signs, order, basis, torch.float64), w


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("basis", ["taylor", "chebyshev"])
def test_block_matches_original_and_converges(tiny_model, basis):
    name, model = tiny_model
    model.double()
    # inside the Taylor series' disc of convergence (GELU-tanh's nearest poles are ~2 from the origin)
    arch, mlp, x, lo, hi = _setup(model, gate_scale=0.3 if basis == "taylor" else 1.0)
    x = x.double()
    with torch.no_grad():
        ref = mlp(x)
        errors = {}
        for order in (2, 4, 8, 16):
            block, _ = _build(model, arch, mlp, lo, hi, order, basis)
            errors[order] = _rel(block(x), ref)
    assert errors[16] < 1e-4, (name, errors)
    assert errors[2] > errors[4] > errors[8] > errors[16], (name, errors)


def test_sign_obfuscation_leaves_outputs_unchanged(tiny_model):
    name, model = tiny_model
    model.double()
    arch, mlp, x, lo, hi = _setup(model, gate_scale=1.5)
    x = x.double()
    signs = np.random.default_rng(1).choice([-1.0, 1.0], size=len(lo))
    assert (signs < 0).any() and (signs > 0).any()
    with torch.no_grad():
        plain, _ = _build(model, arch, mlp, lo, hi, 8, "taylor")
        signed, _ = _build(model, arch, mlp, lo, hi, 8, "taylor", signs=signs)
        assert not torch.equal(plain.gate.weight, signed.gate.weight)
        assert _rel(signed(x), plain(x)) < 1e-10


def test_partial_coverage_adds_rest_mlp(tiny_model):
    name, model = tiny_model
    model.double()
    arch, mlp, x, lo, hi = _setup(model, gate_scale=1.0)
    x = x.double()
    mask = np.arange(len(lo)) % 3 == 0
    with torch.no_grad():
        block, _ = _build(model, arch, mlp, lo, hi, 16, "chebyshev", mask=mask)
        assert block.protected == mask.sum() and block.rest is not None
        assert _rel(block(x), mlp(x)) < 1e-5


def test_no_protected_weight_or_bias_survives(tiny_model):
    name, model = tiny_model
    arch, mlp, x, lo, hi = _setup(model, gate_scale=1.5)
    mask = np.arange(len(lo)) % 2 == 0
    signs = np.random.default_rng(2).choice([-1.0, 1.0], size=len(lo))
    block, w = _build(model, arch, mlp, lo, hi, 8, "taylor", mask=mask, signs=signs)
    sel = np.flatnonzero(mask)
    protected_cols = [w.W[:, j].float() for j in sel]
    secrets = list(protected_cols)
    if w.b is not None:
        secrets.append(w.b[sel].float())
    if w.c is not None:
        secrets.append(w.c.float())
    for pname, tensor in block.state_dict().items():
        t = tensor.float()
        vectors = [t] if t.dim() == 1 else [t[:, j] for j in range(t.shape[1])] + [t[i] for i in range(t.shape[0])]
        for v in vectors:
            for s in secrets:
                if v.shape == s.shape:
                    assert not torch.allclose(v, s, rtol=1e-6, atol=0), f"{name}: {pname} stores a protected tensor"
                    assert not torch.allclose(v, -s, rtol=1e-6, atol=0), f"{name}: {pname} stores a negated one"


def test_out_of_range_inputs_stay_finite(tiny_model):
    name, model = tiny_model
    arch, mlp, x, lo, hi = _setup(model, gate_scale=1.5)
    block, _ = _build(model, arch, mlp, lo, hi, 32, "taylor")
    block = block.float()
    huge = torch.randn(2, 3, x.shape[-1]) * 1e6
    nan = torch.full((1, 1, x.shape[-1]), float("nan"))
    with torch.no_grad():
        assert torch.isfinite(block(huge)).all()
        out = block(torch.cat([x[:1, :1], nan], 1))
    assert torch.isfinite(out[:, 0]).all()


def test_piecewise_series_is_more_accurate_and_partitions_the_line(tiny_model):
    """Pieces: each input is served by exactly one piece of its channel (inside, between and outside the
    intervals, with random signs), and splitting wide intervals buys accuracy at the same order."""
    name, model = tiny_model
    arch, mlp, x, lo, hi = _setup(model, gate_scale=6.0)  # wide pre-activations
    signs = np.random.default_rng(1).choice([-1.0, 1.0], size=len(lo))
    with torch.no_grad():
        ref = mlp(x).double()
    one, _ = _build(model, arch, mlp, lo, hi, 6, "chebyshev", signs=signs)
    many, _ = _build(model, arch, mlp, lo, hi, 6, "chebyshev", signs=signs, max_pieces=8)
    assert many.pieces > many.protected  # some channels were split
    with torch.no_grad():
        err_one = _rel(one(x.double()), ref)
        err_many = _rel(many(x.double()), ref)
        far = many(x.double() * 3.0)  # well outside the calibrated intervals
    assert err_many < err_one / 4, (name, err_one, err_many)
    assert err_many < 1e-4, (name, err_many)
    assert torch.isfinite(far).all()
    # the live-piece masks partition every channel's line: count live pieces per channel at many z
    z = torch.linspace(-50, 50, 2001, dtype=torch.float64)[:, None].expand(-1, many.pieces)
    live = ((z >= many.edge_lo) & (z < many.edge_hi)).double()
    per_channel = torch.zeros(z.shape[0], many.protected, dtype=torch.float64).index_add_(1, many.owner, live)
    assert torch.equal(per_channel, torch.ones_like(per_channel))


def test_split_pieces_remembered_split_gives_the_same_pieces():
    """--slowdown refits fixed pieces at many orders: the remembered bisection must give what a fresh one gives."""

    rng = np.random.default_rng(3)
    lo = -rng.uniform(1, 8, 40)
    hi = rng.uniform(1, 8, 40)
    fresh = {}
    for order in (6, 12, 8):
        fresh[order] = split_pieces("chebyshev", "silu", lo, hi, order, 1e-4, 6, split_order=8, splits={})
    splits: dict = {}
    for order in (8, 12, 6):  # the first call decides the split, the others reuse it
        pieces, err = split_pieces("chebyshev", "silu", lo, hi, order, 1e-4, 6, split_order=8, splits=splits)
        assert len(splits) == 1
        want, want_err = fresh[order]
        assert len(pieces.owner) > len(lo)  # some channels were split
        for name in ("owner", "lo", "hi", "coeffs", "edge_lo", "edge_hi"):
            np.testing.assert_array_equal(getattr(pieces, name), getattr(want, name))
        np.testing.assert_array_equal(err, want_err)


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(basis=st.sampled_from(["taylor", "chebyshev"]), family=st.sampled_from(["gated", "plain"]),
       order=st.integers(0, 12), channels=st.integers(1, 6), extra_pieces=st.integers(0, 5),
       tokens=st.integers(1, 5), scale=st.sampled_from([0.1, 1.0, 30.0]), seed=st.integers(0, 2 ** 16),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_in_place_features_are_bit_identical_to_the_formulas(basis, family, order, channels, extra_pieces, tokens,
                                                             scale, seed, dtype):
    """TaylorMLP.features (one preallocated tensor filled in place, used without autograd) equals
    features_differentiable (the formulas out of place) bit for bit: inside and outside the intervals (scale 30
    sends most t past ±1), one or several pieces per channel, every order, NaN inputs included."""
    g = torch.Generator().manual_seed(seed)
    hidden, pieces = 4, channels + extra_pieces
    mlp = runtime.TaylorMLP(family, hidden, channels, 0, order, basis, "silu", pieces=pieces).to(dtype)
    with torch.no_grad():
        for p in mlp.parameters():
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
        mlp.h.abs_().add_(0.1)
        if pieces > channels:
            mlp.owner.copy_(torch.cat([torch.arange(channels), torch.randint(0, channels, (extra_pieces,),
                                                                             generator=g)]))
            cuts = torch.randn(pieces, 2, generator=g, dtype=dtype).sort(-1).values
            mlp.edge_lo.copy_(cuts[:, 0])
            mlp.edge_hi.copy_(cuts[:, 1])
    x = torch.randn(2, tokens, hidden, generator=g, dtype=dtype) * scale
    x[0, 0, 0] = float("nan")
    with torch.no_grad():
        fast = mlp.features(x)
        reference = mlp.features_differentiable(x)
    assert fast.dtype == reference.dtype and fast.shape == reference.shape
    assert torch.equal(torch.nan_to_num(fast, nan=7.0), torch.nan_to_num(reference, nan=7.0))
    x.requires_grad_(True)  # with autograd recording, the differentiable form runs and gradients flow
    mlp(x).nan_to_num().sum().backward()
    assert mlp.theta.grad is not None
    if order > 0 or family == "gated":  # a plain series of order 0 is the constant Θ_0: x has no gradient to get
        assert x.grad is not None


# ---------------------------------------------------------------- the series maths the attacks share with the module


def _diagonal_block(basis: str, coeffs: torch.Tensor, z0: torch.Tensor, h: torch.Tensor) -> runtime.TaylorMLP:
    """A TaylorMLP (plain, gate = identity) whose output j is channel j's series Σ_n coeffs[j, n] φ_n(t_j) alone."""
    P, K = coeffs.shape
    mlp = runtime.TaylorMLP("plain", P, P, 0, K - 1, basis, "silu").double()
    with torch.no_grad():
        mlp.gate.weight.copy_(torch.eye(P, dtype=torch.float64))
        mlp.z0.copy_(z0)
        mlp.h.copy_(h)
        theta = torch.zeros(P, K, P, dtype=torch.float64)  # [outputs, orders, channels]
        theta[torch.arange(P), :, torch.arange(P)] = coeffs
        mlp.theta.copy_(theta.reshape(P, -1))
    return mlp


@pytest.mark.parametrize("basis", ["taylor", "chebyshev"])
@pytest.mark.parametrize("order", [0, 1, 2, 7, 16])
def test_series_values_is_what_the_module_evaluates(basis, order):
    """series.series_values (Horner / Clenshaw and the edge slopes: what the attacks evaluate) against the module's
    forward (basis recurrences, one stacked matmul): inside [-1, 1], past both ends, and at a NaN input."""
    g = torch.Generator().manual_seed(order)
    P = 6
    coeffs = torch.randn(P, order + 1, generator=g, dtype=torch.float64)
    z0 = torch.randn(P, generator=g, dtype=torch.float64)
    h = torch.rand(P, generator=g, dtype=torch.float64) + 0.2
    mlp = _diagonal_block(basis, coeffs, z0, h)
    t = torch.cat([torch.linspace(-3.0, 3.0, 61, dtype=torch.float64)[:, None].expand(-1, P),
                   torch.randn(40, P, generator=g, dtype=torch.float64) * 2.0])
    x = t * h + z0
    x[0, 0] = float("nan")  # the identity gate spreads it over the row: z = NaN for every channel of token 0
    with torch.no_grad():
        ref = mlp(x)
        got = series.series_values(basis, coeffs, (mlp.gate(x) - z0) / h)
    assert got.shape == ref.shape and torch.isfinite(got).all()
    assert float((got - ref).abs().max()) <= 1e-12 * float(ref.abs().max()), (basis, order)


def test_release_class_without_the_transformers_class_says_to_upgrade(monkeypatch, tmp_path):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    assert runtime.release_class(config).__name__ == "TaylorMLPLlamaForCausalLM"
    monkeypatch.delitem(vars(runtime), "TaylorMLPLlamaForCausalLM")  # as if this transformers had no Llama
    with pytest.raises(ValueError) as info:
        runtime.release_class(config)
    message = str(info.value)
    assert "LlamaForCausalLM" in message and transformers.__version__ in message, message
    assert "upgrade transformers" in message and "\n" not in message, message
    config.save_pretrained(tmp_path)
    with pytest.raises(TaylorMLPError, match="LlamaForCausalLM.*upgrade transformers"):
        load_release(tmp_path, verify=False)
