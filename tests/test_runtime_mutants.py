"""runtime.py's contracts that `make mutate` found untested (each test names what it pins).

References are independent of the code under test: torch's own activations and linear algebra, numpy.polynomial for
values and derivatives of the bases, the transformers classes themselves, and small hand-worked cases."""

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from numpy.polynomial import chebyshev as C
from numpy.polynomial import polynomial as P

from taylormlp import runtime, series_module
from taylormlp.maths import series

F = torch.nn.functional
BASES = ["taylor", "chebyshev"]


def _np_value(basis, c, t):
    return (P.polyval if basis == "taylor" else C.chebval)(t, c)


def _np_slope(basis, c, t):
    return (P.polyval(t, P.polyder(c)) if basis == "taylor" else C.chebval(t, C.chebder(c))) if len(c) > 1 else 0.0


# ---------------------------------------------------------------- the architecture table and config helpers


def test_unsupported_architecture_names_the_supported_ones():
    supported = "gemma, gemma2, gemma3_text, gpt2, llama, mistral, phi, qwen2"
    with pytest.raises(ValueError, match=rf"^unsupported architecture 'bert'; supported model types: {supported}$"):
        runtime.architecture(SimpleNamespace(model_type="bert"))
    with pytest.raises(ValueError, match=r"^unsupported architecture None; "):
        runtime.architecture(SimpleNamespace())


def test_table_entries_describe_the_transformers_models(tiny_model):
    """Each entry's layer path, linear names, Conv1D flag, activation key and class name fit the real model."""
    name, model = tiny_model
    arch = runtime.architecture(model.config)
    layers = runtime.decoder_layers(model)
    assert isinstance(layers, torch.nn.ModuleList) and len(layers) == model.config.num_hidden_layers
    base = model.transformer.h if name == "gpt2" else model.model.layers
    assert layers is base
    mlp = layers[0].mlp
    for key in ("gate", "down") + (("up",) if arch["family"] == "gated" else ()):
        assert isinstance(getattr(mlp, arch[key]), torch.nn.Module)
    assert (arch["up"] is None) == (arch["family"] == "plain")
    assert (type(getattr(mlp, arch["gate"])).__name__ == "Conv1D") == arch["conv1d"]
    assert type(model).__name__ == arch["model_class"]
    assert runtime.activation_name(model.config) == getattr(model.config, arch["act_key"])
    assert runtime.activation_name(model.config) is not None


def test_activation_name_falls_back_to_hidden_act_only_for_old_gemma_configs():
    gemma = dict(model_type="gemma", hidden_act="gelu")
    assert runtime.activation_name(SimpleNamespace(**gemma, hidden_activation=None)) == "gelu"
    assert runtime.activation_name(SimpleNamespace(**gemma)) == "gelu"
    assert runtime.activation_name(SimpleNamespace(**gemma, hidden_activation="gelu_pytorch_tanh")) == \
        "gelu_pytorch_tanh"
    assert runtime.activation_name(SimpleNamespace(model_type="llama", hidden_act="silu",
                                                   hidden_activation="gelu")) == "silu"
    assert runtime.activation_name(SimpleNamespace(model_type="gpt2", activation_function="gelu_new",
                                                   hidden_act="silu")) == "gelu_new"
    assert runtime.activation_name(SimpleNamespace(model_type="gpt2", hidden_act="silu")) is None


def test_linear_weight_is_out_by_in_for_linear_and_conv1d():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    x = torch.randn(4, 3)
    conv, lin = Conv1D(5, 3), torch.nn.Linear(3, 5)
    for module in (conv, lin):
        w = runtime.linear_weight(module)
        assert w.shape == (5, 3)
        torch.testing.assert_close(x @ w.T + module.bias, module(x))
    assert runtime.linear_weight(lin) is lin.weight


@pytest.mark.parametrize("name, ref", [
    ("silu", F.silu), ("swish", F.silu), ("gelu", F.gelu),
    ("gelu_tanh", lambda z: F.gelu(z, approximate="tanh")),
    ("gelu_pytorch_tanh", lambda z: F.gelu(z, approximate="tanh")),
])
def test_torch_activation_is_the_named_function(name, ref):
    z = torch.linspace(-6, 6, 49, dtype=torch.float64)
    torch.testing.assert_close(runtime.torch_activation(name)(z), ref(z), rtol=1e-12, atol=1e-12)


def test_torch_activation_refuses_unknown_names():
    with pytest.raises(ValueError, match=r"^activation 'relu6x' is not supported$"):
        runtime.torch_activation("relu6x")


# ---------------------------------------------------------------- the basis maths: edge slopes, series values


@pytest.mark.parametrize("basis", BASES)
def test_edge_slopes_are_the_basis_derivatives_at_plus_and_minus_one(basis):
    for order in (0, 1, 2, 5, 9):
        plus, minus = runtime.edge_slopes(basis, order)
        assert isinstance(plus, tuple) and isinstance(minus, tuple)
        assert len(plus) == len(minus) == order + 1
        assert all(type(s) is float for s in plus + minus)
        for n in range(order + 1):
            unit = np.eye(order + 1)[n]
            assert plus[n] == _np_slope(basis, unit, 1.0), (n, plus)
            assert minus[n] == _np_slope(basis, unit, -1.0), (n, minus)


def test_basis_errors_name_the_basis_and_the_choices():
    msg = re.escape("unknown basis 'legendre'; choose one of ('taylor', 'chebyshev')")
    with pytest.raises(ValueError, match=f"^{msg}$"):
        runtime.edge_slopes("legendre", 3)
    with pytest.raises(ValueError, match=f"^{msg}$"):
        series.series_values("legendre", torch.zeros(4), torch.zeros(2))
    with pytest.raises(ValueError, match=f"^{msg}$"):
        runtime.TaylorMLP("plain", 4, 2, 0, 3, "legendre", "silu")


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_series_slopes_match_numpy_derivatives(basis, dtype):
    g = torch.Generator().manual_seed(1)
    coeffs = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    plus, minus = series.series_slopes(basis, coeffs.to(dtype))
    assert plus.dtype == minus.dtype == dtype and plus.shape == minus.shape == (2, 3)
    for i, j in np.ndindex(2, 3):
        c = coeffs[i, j].numpy()
        tol = 1e-12 if dtype == torch.float64 else 1e-4
        assert float(plus[i, j]) == pytest.approx(_np_slope(basis, c, 1.0), rel=tol, abs=tol)
        assert float(minus[i, j]) == pytest.approx(_np_slope(basis, c, -1.0), rel=tol, abs=tol)


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("order", [0, 1, 2, 6])
def test_series_values_match_numpy_inside_and_continue_linearly_outside(basis, order):
    """Inside [-1, 1] the polynomial (numpy.polynomial), past ±1 the tangent line at the edge, NaN as t = 0;
    coefficients [P, N+1] against t [tokens, P], and caller-supplied slopes are used as given."""
    g = torch.Generator().manual_seed(order)
    coeffs = torch.randn(3, order + 1, generator=g, dtype=torch.float64)
    t = torch.tensor([[-3.5, -1.0, -0.25], [0.0, 0.6, 1.0], [1.75, float("nan"), -1.2], [4.0, 2.5, 0.999]],
                     dtype=torch.float64)
    got = series.series_values(basis, coeffs, t)
    assert got.shape == t.shape and got.dtype == torch.float64
    for k, j in np.ndindex(*t.shape):
        c, x = coeffs[j].numpy(), float(t[k, j])
        x = 0.0 if np.isnan(x) else x
        xc = min(max(x, -1.0), 1.0)
        ref = _np_value(basis, c, xc) + (x - xc) * _np_slope(basis, c, xc)
        assert float(got[k, j]) == pytest.approx(ref, rel=1e-12, abs=1e-12), (k, j)
    flat = (torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    clamped = series.series_values(basis, coeffs, t, slopes=flat)  # zero slopes: constant past the edges
    torch.testing.assert_close(clamped, series.series_values(basis, coeffs, t.nan_to_num(0.0).clamp(-1, 1)),
                               rtol=1e-14, atol=1e-14)


# ---------------------------------------------------------------- the module's parts


def _diagonal(family, basis, order, z0, h, dtype=torch.float64):
    """A TaylorMLP over P = len(z0) channels with an identity gate (z = x) and, gated, up = 2·identity."""
    P_ = len(z0)
    mlp = runtime.TaylorMLP(family, P_, P_, 0, order, basis, "silu").to(dtype)
    with torch.no_grad():
        mlp.gate.weight.copy_(torch.eye(P_, dtype=dtype))
        if mlp.up is not None:
            mlp.up.weight.copy_(2 * torch.eye(P_, dtype=dtype))
        mlp.z0.copy_(torch.as_tensor(z0, dtype=dtype))
        mlp.h.copy_(torch.as_tensor(h, dtype=dtype))
    return mlp


def test_coordinates_are_the_normalised_clamped_variable():
    mlp = _diagonal("plain", "taylor", 2, [1.0, -2.0, 0.5], [2.0, 0.5, 1.0])
    nan = float("nan")  # (a NaN input reaches every channel of its token through the gate matmul)
    x = torch.tensor([[5.0, -2.25, 0.5], [1.0, -1.0, -3.0], [nan, nan, nan]], dtype=torch.float64)
    tc, excess, u, active = mlp.coordinates(x)
    t = torch.tensor([[2.0, -0.5, 0.0], [0.0, 2.0, -3.5], [0.0, 0.0, 0.0]], dtype=torch.float64)  # (x - z0) / h
    torch.testing.assert_close(tc, t.clamp(-1, 1), rtol=0, atol=0)
    torch.testing.assert_close(excess, t - t.clamp(-1, 1), rtol=0, atol=0)
    assert u is None and active is None


@pytest.mark.parametrize("dtype, work", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                         (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_piece_inputs_work_in_float32_or_wider(dtype, work):
    mlp = _diagonal("gated", "taylor", 2, [0.0, 0.0], [1.0, 1.0], dtype=dtype)
    z, u, active = runtime.piece_inputs(mlp, torch.tensor([[0.5, -1.5]], dtype=dtype))
    assert z.dtype == u.dtype == work and active is None
    torch.testing.assert_close(z, torch.tensor([[0.5, -1.5]], dtype=work))
    torch.testing.assert_close(u, torch.tensor([[1.0, -3.0]], dtype=work))


def test_pieces_read_their_channel_and_are_live_on_half_open_intervals():
    """Piece q serves channel owner[q] where edge_lo[q] <= z < edge_hi[q]."""
    mlp = runtime.TaylorMLP("gated", 2, 2, 0, 1, "taylor", "silu", pieces=4).double()
    with torch.no_grad():
        mlp.gate.weight.copy_(torch.eye(2, dtype=torch.float64))
        mlp.up.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 5.0]], dtype=torch.float64))
        mlp.owner.copy_(torch.tensor([0, 1, 1, 0]))
        mlp.edge_lo.copy_(torch.tensor([-float("inf"), -float("inf"), 0.0, 1.0], dtype=torch.float64))
        mlp.edge_hi.copy_(torch.tensor([1.0, 0.0, float("inf"), float("inf")], dtype=torch.float64))
    x = torch.tensor([[1.0, 0.0], [0.5, -2.0]], dtype=torch.float64)
    z, u, active = runtime.piece_inputs(mlp, x)
    torch.testing.assert_close(z, torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, -2.0, -2.0, 0.5]], dtype=torch.float64))
    torch.testing.assert_close(u, torch.tensor([[3.0, 0.0, 0.0, 3.0], [1.5, -10.0, -10.0, 1.5]],
                                               dtype=torch.float64))
    assert active.tolist() == [[False, False, True, True], [True, True, False, False]]


@pytest.mark.parametrize("family", ["gated", "plain"])
@pytest.mark.parametrize("bias", [False, True])
def test_rest_mlp_is_the_ordinary_block(family, bias):
    torch.manual_seed(0)
    rest = runtime.RestMLP(family, 4, 3, "gelu_tanh", bias, bias).double()
    assert (rest.gate.bias is not None) == bias and (rest.down.bias is not None) == bias
    assert (rest.up is not None) == (family == "gated") and (rest.up is None or rest.up.bias is None)
    assert rest.gate.weight.shape == (3, 4) and rest.down.weight.shape == (4, 3)
    assert rest.family == family and rest.act_name == "gelu_tanh"
    x = torch.randn(2, 4, dtype=torch.float64)
    a = F.gelu(F.linear(x, rest.gate.weight, rest.gate.bias), approximate="tanh")
    if family == "gated":
        a = a * (x @ rest.up.weight.T)
    torch.testing.assert_close(rest(x), F.linear(a, rest.down.weight, rest.down.bias))


def test_taylor_mlp_refuses_bad_shapes_and_names():
    with pytest.raises(ValueError, match=r"^unknown MLP family 'moe'$"):
        runtime.TaylorMLP("moe", 4, 2, 0, 3, "taylor", "silu")
    with pytest.raises(ValueError, match=re.escape("a layer needs at least one series piece per protected channel "
                                                   "(1 < 2)") + "$"):
        runtime.TaylorMLP("plain", 4, 2, 0, 3, "taylor", "silu", pieces=1)
    runtime.TaylorMLP("plain", 4, 2, 0, 3, "taylor", "silu", pieces=2)  # exactly one per channel is fine


@pytest.mark.parametrize("family", ["gated", "plain"])
def test_an_empty_taylor_mlp_has_the_release_shapes(family):
    one = runtime.TaylorMLP(family, 8, 3, 0, 4, "chebyshev", "silu")
    assert one.pieces == 3 and not hasattr(one, "owner") and one.rest is None
    assert one.family == family and one.hidden == 8 and one.protected == 3 and one.order == 4
    assert one.basis == "chebyshev"
    assert one.extra_repr() == f"family={family}, protected=3, pieces=3, order=4, basis=chebyshev"
    many = runtime.TaylorMLP(family, 8, 3, 5, 4, "taylor", "gelu", rest_bias=True, rest_out_bias=True, pieces=7)
    assert many.extra_repr() == f"family={family}, protected=3, pieces=7, order=4, basis=taylor"
    assert many.gate.weight.shape == (3, 8) and many.gate.bias is None
    assert (many.up is None) == (family == "plain")
    if many.up is not None:
        assert many.up.weight.shape == (3, 8) and many.up.bias is None
    assert torch.equal(many.z0, torch.zeros(7)) and torch.equal(many.h, torch.ones(7))
    assert torch.equal(many.owner, torch.zeros(7, dtype=torch.long))
    assert torch.equal(many.edge_lo, torch.full((7,), -float("inf")))
    assert torch.equal(many.edge_hi, torch.full((7,), float("inf")))
    for p in (many.z0, many.h, many.owner, many.edge_lo, many.edge_hi):
        assert not p.requires_grad
    assert many.theta.shape == (8, 5 * 7) and torch.equal(many.theta, torch.zeros(8, 35))
    rest = many.rest
    assert isinstance(rest, runtime.RestMLP) and rest.family == family and rest.act_name == "gelu"
    assert rest.gate.weight.shape == (5, 8) and rest.gate.bias is not None and rest.down.bias is not None
    plain_rest = runtime.TaylorMLP(family, 8, 3, 5, 4, "taylor", "gelu").rest
    assert plain_rest.gate.bias is None and plain_rest.down.bias is None


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("family", ["gated", "plain"])
def test_forward_is_the_series_worked_by_hand(basis, family):
    """One output per channel: y_j = Σ_n θ_{j,n} φ_n(t_j) (⊙ u_j gated), with the tangent line past ±1."""
    z0, h = [0.5, -1.0], [2.0, 0.5]
    mlp = _diagonal(family, basis, 2, z0, h)
    theta = torch.tensor([[1.0, -2.0, 3.0], [0.5, 4.0, -1.5]], dtype=torch.float64)  # [channel, order]
    full = torch.zeros(2, 3, 2, dtype=torch.float64)
    full[0, :, 0], full[1, :, 1] = theta[0], theta[1]
    with torch.no_grad():
        mlp.theta.copy_(full.reshape(2, -1))
    x = torch.tensor([[1.5, -1.25], [6.5, 0.0], [-7.5, -3.0]], dtype=torch.float64)
    with torch.no_grad():
        y = mlp(x)
    for k in range(3):
        for j in range(2):
            t = (float(x[k, j]) - z0[j]) / h[j]
            tc = min(max(t, -1.0), 1.0)
            phi = [1.0, tc, tc * tc if basis == "taylor" else 2 * tc * tc - 1]
            dphi = [0.0, 1.0, 2 * tc if basis == "taylor" else 4 * tc]
            ref = sum(float(theta[j, n]) * (phi[n] + dphi[n] * (t - tc)) for n in range(3))
            if family == "gated":
                ref *= 2 * float(x[k, j])
            assert float(y[k, j]) == pytest.approx(ref, rel=1e-13, abs=1e-13), (k, j)


def test_forward_returns_the_input_dtype_and_adds_the_rest():
    torch.manual_seed(0)
    mlp = runtime.TaylorMLP("gated", 4, 2, 3, 3, "chebyshev", "silu").double()
    with torch.no_grad():
        for p in mlp.parameters():
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, dtype=torch.float64))
        mlp.h.abs_().add_(0.5)
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    with torch.no_grad():
        y = mlp(x)
        series = F.linear(mlp.features(x), mlp.theta)
        torch.testing.assert_close(y, series + mlp.rest(x), rtol=1e-14, atol=1e-14)
        low = mlp.to(torch.bfloat16)
        y16 = low(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.double(), y, rtol=0.05, atol=0.05 * float(y.abs().max()))


def test_features_take_the_in_place_path_unless_autograd_needs_the_formulas(monkeypatch):
    """features() runs in place under no_grad or with frozen inputs, out of place when a gradient is wanted."""
    mlp = _diagonal("gated", "chebyshev", 3, [0.0, 1.0], [1.0, 2.0])
    x = torch.tensor([[0.3, 5.0]], dtype=torch.float64)
    with torch.no_grad():
        ref = mlp.features_differentiable(x)
    calls = []
    original = runtime.TaylorMLP.features_differentiable

    def spy(self, inp, dtype=None):
        calls.append(1)
        return original(self, inp, dtype)

    monkeypatch.setattr(runtime.TaylorMLP, "features_differentiable", spy)
    with torch.no_grad():
        assert torch.equal(mlp.features(x), ref)
    assert calls == []
    for p in mlp.parameters():
        p.requires_grad_(False)
    assert torch.equal(mlp.features(x), ref) and calls == []  # grad mode on, but nothing asks for a gradient
    mlp.up.weight.requires_grad_(True)  # one input wants a gradient: the differentiable form runs
    assert torch.equal(mlp.features(x).detach(), ref) and calls == [1]
    mlp.up.weight.requires_grad_(False)
    assert torch.equal(mlp.features(x.requires_grad_(True)).detach(), ref) and calls == [1, 1]


# ---------------------------------------------------------------- the release spec and the release classes

SPEC = {
    "format_version": runtime.FORMAT_VERSION, "family": "gated", "hidden_size": 16, "activation": "silu",
    "order": 4, "basis": "chebyshev", "coverage": 0.5, "rest_bias": False, "preset": "default",
    "layers": [{"protected": 3, "rest": 29}, {"protected": 2, "rest": 30, "pieces": 5, "rest_out_bias": True}],
    "calibration": {"prompts": 4}, "validation": "passed",
}


def _tiny_llama_config():
    return transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1)


def test_release_spec_round_trips_and_keeps_what_protect_recorded():
    spec = runtime.ReleaseSpec.from_dict(SPEC)
    assert spec.family == "gated" and spec.hidden_size == 16 and spec.order == 4 and spec.basis == "chebyshev"
    assert spec.coverage == 0.5 and spec.preset == "default" and spec.selection is None and spec.margin is None
    assert spec.max_pieces is None and spec.format_version == runtime.FORMAT_VERSION
    assert spec.layers == [runtime.LayerShape(3, 29), runtime.LayerShape(2, 30, pieces=5, rest_out_bias=True)]
    assert spec.layers[0].pieces is None and spec.layers[0].rest_out_bias is False
    assert spec.record == {"calibration": {"prompts": 4}, "validation": "passed"}
    back = spec.to_dict()
    assert back == {**SPEC, "selection": None, "margin": None, "max_pieces": None, "masked": {},
                    "layers": [{"protected": 3, "rest": 29, "pieces": None, "rest_out_bias": False},
                               SPEC["layers"][1]]}
    assert runtime.ReleaseSpec.from_dict(back) == spec
    minimal = {k: SPEC[k] for k in ("format_version", "family", "hidden_size", "activation", "order", "basis",
                                    "coverage", "layers")}
    m = runtime.ReleaseSpec.from_dict(minimal)
    assert m.rest_bias is False and m.preset is None and m.record == {}
    # layers may be plain dicts in a spec built by hand
    raw = runtime.ReleaseSpec(**{k: v for k, v in minimal.items() if k != "format_version"})
    assert raw.to_dict()["layers"] == SPEC["layers"]


@pytest.mark.parametrize("spec, message", [
    (None, "config.json has no 'taylormlp' section: this is not a taylormlp release"),
    ([1, 2], "config.json has no 'taylormlp' section: this is not a taylormlp release"),
    ({**SPEC, "format_version": 99}, "unknown taylormlp format_version 99; this runtime reads versions 1 and 2 "
                                     "(a release from another taylormlp version?)"),
    ({k: v for k, v in SPEC.items() if k != "format_version"}, "unknown taylormlp format_version None; "),
    ({k: v for k, v in SPEC.items() if k not in ("order", "coverage")},
     "the taylormlp section of config.json lacks order, coverage: a damaged release"),
    ({**SPEC, "layers": [{"protected": 3}]}, "the taylormlp section's layers are malformed ("),
    ({**SPEC, "layers": [7]}, "the taylormlp section's layers are malformed ("),
    ({**SPEC, "masked": ["hidden_act"]}, "the taylormlp section's masked keys are not a dict: a damaged release"),
])
def test_release_spec_refuses_what_is_not_a_release(spec, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)) as info:
        runtime.ReleaseSpec.from_dict(spec)
    if "malformed" in message:
        assert str(info.value).endswith("): a damaged release")


def test_install_taylor_mlps_and_the_release_class_build_the_described_layers():
    config = _tiny_llama_config()
    model = transformers.LlamaForCausalLM(config)
    for spec in (SPEC, runtime.ReleaseSpec.from_dict(SPEC)):
        runtime.install_taylor_mlps(model, spec)
        shapes = [(m.mlp.family, m.mlp.hidden, m.mlp.protected, m.mlp.pieces, m.mlp.order, m.mlp.basis,
                   m.mlp.rest.gate.weight.shape[0], m.mlp.rest.down.bias is not None) for m in model.model.layers]
        assert shapes == [("gated", 16, 3, 3, 4, "chebyshev", 29, False), ("gated", 16, 2, 5, 4, "chebyshev", 30, True)]
    with pytest.raises(ValueError, match=r"^release describes 1 layers, the model has 2$"):
        runtime.install_taylor_mlps(model, {**SPEC, "layers": SPEC["layers"][:1]})
    cls = runtime.release_class(config)
    assert cls.__name__ == "TaylorMLPLlamaForCausalLM" and issubclass(cls, transformers.LlamaForCausalLM)
    with pytest.raises(ValueError, match="no 'taylormlp' section"):
        cls(config)
    config.taylormlp = SPEC
    released = cls(config)
    assert [type(m.mlp) for m in released.model.layers] == [runtime.TaylorMLP] * 2
    assert [m.mlp.pieces for m in released.model.layers] == [3, 5]


def test_every_architecture_has_its_release_class():
    for model_type, entry in runtime.ARCHITECTURES.items():
        cls = runtime.release_class(SimpleNamespace(model_type=model_type))
        base = getattr(transformers, entry["model_class"])
        assert cls.__name__ == "TaylorMLP" + entry["model_class"] and cls.__bases__ == (base,)


# ---------------------------------------------------------------- second round: what the first mutation run left


def test_activation_name_is_none_when_the_config_names_none():
    assert runtime.activation_name(SimpleNamespace(model_type="gemma")) is None
    assert runtime.activation_name(SimpleNamespace(model_type="llama")) is None


@pytest.mark.parametrize("basis", BASES)
def test_series_maths_stays_on_the_coefficients_device(basis):
    """The edge slopes are made on the coefficients' device (meta here: no data, but device checks are real)."""
    coeffs = torch.zeros(3, 5, device="meta")
    plus, minus = series.series_slopes(basis, coeffs)
    assert plus.device.type == minus.device.type == "meta" and plus.shape == (3,)
    assert series.series_values(basis, coeffs, torch.zeros(2, 3, device="meta")).device.type == "meta"


def test_empty_layers_build_quietly_without_silencing_other_warnings():
    """A layer with no protected channel (or no rest) makes zero-element Linears: torch's warning about initialising
    them is silenced, and only that one."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime.TaylorMLP("gated", 4, 0, 3, 2, "taylor", "silu")
        warnings.warn("another warning", UserWarning)
    assert [str(w.message) for w in caught] == ["another warning"]


def test_a_single_rest_channel_gets_its_mlp():
    mlp = runtime.TaylorMLP("plain", 4, 2, 1, 2, "taylor", "silu")
    assert isinstance(mlp.rest, runtime.RestMLP) and mlp.rest.gate.weight.shape == (1, 4)


def _piecewise(dtype=torch.float64):
    """2 channels, 5 pieces (channel 0: 2 pieces split at 0, channel 1: 3 pieces split at -1 and 1), order 3."""
    mlp = runtime.TaylorMLP("gated", 2, 2, 0, 3, "chebyshev", "silu", pieces=5).to(dtype)
    inf = float("inf")
    with torch.no_grad():
        mlp.gate.weight.copy_(torch.eye(2, dtype=dtype))
        mlp.up.weight.copy_(torch.eye(2, dtype=dtype))
        mlp.owner.copy_(torch.tensor([0, 0, 1, 1, 1]))
        mlp.edge_lo.copy_(torch.tensor([-inf, 0.0, -inf, -1.0, 1.0], dtype=dtype))
        mlp.edge_hi.copy_(torch.tensor([0.0, inf, -1.0, 1.0, inf], dtype=dtype))
        mlp.z0.copy_(torch.tensor([-1.0, 1.0, -2.0, 0.0, 2.0], dtype=dtype))
        mlp.h.copy_(torch.ones(5, dtype=dtype))
    return mlp


def _features_by_hand(mlp, x):
    """[tokens, (N+1)·Q] features of a gated block from the definitions: T_n with the tangent line past ±1, ⊙ live,
    ⊙ u; gate and up are the identity here."""
    N, Q = mlp.order, mlp.pieces
    out = torch.zeros(x.shape[0], N + 1, Q, dtype=torch.float64)
    for k in range(x.shape[0]):
        for q in range(Q):
            z = float(x[k, mlp.owner[q]]) if hasattr(mlp, "owner") else float(x[k, q])
            live = (not hasattr(mlp, "owner")) or float(mlp.edge_lo[q]) <= z < float(mlp.edge_hi[q])
            t = (z - float(mlp.z0[q])) / float(mlp.h[q])
            tc = min(max(t, -1.0), 1.0)
            for n in range(N + 1):
                unit = np.eye(N + 1)[n]
                value = _np_value(mlp.basis, unit, tc) + (t - tc) * _np_slope(mlp.basis, unit, tc)
                out[k, n, q] = value * live * z
    return out.flatten(-2)


def test_piecewise_features_of_a_2d_input_match_the_definitions():
    """Tokens as a 2-d [tokens, hidden] input (no batch axis): the live mask broadcasts over the orders, not the
    pieces, in both forms."""
    mlp = _piecewise()
    x = torch.tensor([[-0.5, 0.5], [0.25, -1.5], [3.0, 1.0], [-4.0, -0.25]], dtype=torch.float64)
    ref = _features_by_hand(mlp, x)
    with torch.no_grad():
        torch.testing.assert_close(mlp.features(x), ref, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(mlp.features_differentiable(x), ref, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("t", [2.0, -2.0, -3.5])
def test_every_input_outside_still_continues_linearly(basis, t):
    """All inputs past the edge (t = 2: every excess is exactly 1), in both forms."""
    mlp = _diagonal("gated", basis, 4, [0.5, -1.0, 2.0], [1.0, 2.0, 0.5])
    x = (mlp.z0 + t * mlp.h).detach()[None, :].repeat(2, 1)
    ref = _features_by_hand(mlp, x) * 2.0  # _diagonal's up is 2·identity
    with torch.no_grad():
        torch.testing.assert_close(mlp.features(x), ref, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(mlp.features_differentiable(x), ref, rtol=1e-13, atol=1e-13)


def test_output_has_the_input_dtype_when_theta_is_kept_wider():
    mlp = _diagonal("plain", "taylor", 2, [0.0, 0.0], [1.0, 1.0], dtype=torch.bfloat16)
    mlp.theta.data = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))  # float32 Θ, bf16 elsewhere
    with torch.no_grad():
        y = mlp(torch.tensor([[0.5, -0.25]], dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_release_spec_keeps_a_recorded_key_named_record():
    spec = runtime.ReleaseSpec.from_dict({**SPEC, "record": {"nested": True}})
    assert spec.record["record"] == {"nested": True}
    assert spec.to_dict()["record"] == {"nested": True}


def test_install_taylor_mlps_gives_the_rest_its_input_bias():
    model = transformers.LlamaForCausalLM(_tiny_llama_config())
    runtime.install_taylor_mlps(model, {**SPEC, "rest_bias": True})
    assert all(m.mlp.rest.gate.bias is not None for m in model.model.layers)


def test_make_release_class_subclasses_the_transformers_class_and_installs_the_mlps():
    """The factory itself (the module-level loop runs it once at import)."""
    cls = runtime._make_release_class("LlamaForCausalLM")
    assert cls.__name__ == "TaylorMLPLlamaForCausalLM" and cls.__bases__ == (transformers.LlamaForCausalLM,)
    assert "__init__" in vars(cls)
    config = _tiny_llama_config()
    with pytest.raises(ValueError, match="^config.json has no 'taylormlp' section"):
        cls(config)
    config.taylormlp = SPEC
    model = cls(config)
    assert model.config is config and isinstance(model, transformers.LlamaForCausalLM)
    assert [m.mlp.pieces for m in model.model.layers] == [3, 5]
    assert model.model.embed_tokens.weight.shape == (64, 16)  # the base class built the rest of the model


def test_release_class_forwards_every_argument_to_the_transformers_class(monkeypatch):
    """from_pretrained calls cls(config, *model_args, **kwargs): all of them reach the base class."""
    seen = {}

    class FakeForCausalLM(torch.nn.Module):
        def __init__(self, config, *args, **kwargs):
            super().__init__()
            seen.update(args=args, kwargs=kwargs)
            self.config = config
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList([torch.nn.Module() for _ in config.taylormlp["layers"]])

    monkeypatch.setattr(runtime.transformers, "FakeForCausalLM", FakeForCausalLM, raising=False)  # what it reads
    cls = runtime._make_release_class("FakeForCausalLM")
    model = cls(SimpleNamespace(model_type="llama", taylormlp=SPEC), "positional", flag=True)
    assert seen == {"args": ("positional",), "kwargs": {"flag": True}}
    assert [type(m.mlp) for m in model.model.layers] == [runtime.TaylorMLP] * 2


# ---------------------------------------------------------------- third round: format 2's masking, base models


def test_masked_config_hides_every_activation_name_and_unmasked_spec_puts_them_back():
    config = _tiny_llama_config()
    config.taylormlp = dict(SPEC, format_version=1)
    act = config.hidden_act
    written = runtime.masked_config(config)
    assert config.hidden_act == act and config.taylormlp["format_version"] == 1  # the model's own config untouched
    assert written.hidden_act == runtime.LOAD_NOTICE and written is not config
    assert written.taylormlp == {**SPEC, "format_version": runtime.FORMAT_VERSION, "masked": {"hidden_act": act}}
    again = runtime.masked_config(written)  # masking a masked config does not record the notice as the real name
    assert again.taylormlp["masked"] == {}
    spec = runtime.unmasked_spec(written)
    assert written.hidden_act == act and spec.masked == {"hidden_act": act} and spec.order == SPEC["order"]


def test_masked_config_leaves_keys_that_are_not_names():
    config = SimpleNamespace(hidden_act=None, hidden_activation=7, activation_function="gelu", taylormlp=SPEC,
                             model_type="gpt2")
    written = runtime.masked_config(config)  # (transformers' own configs refuse a None name; a plain object does not)
    assert written.hidden_act is None and written.hidden_activation == 7  # not strings: nothing to hide
    assert written.activation_function == runtime.LOAD_NOTICE
    assert written.taylormlp["masked"] == {"activation_function": "gelu"}


def test_base_model_release_class_installs_into_the_base_model():
    config = _tiny_llama_config()
    cls = runtime.release_class(config, base=True)
    assert cls.__name__ == "TaylorMLPLlamaModel" and cls.__bases__ == (transformers.LlamaModel,)
    config.taylormlp = SPEC
    model = cls(config)
    assert [m.mlp.pieces for m in model.layers] == [3, 5]  # layers sit at model.layers, one attribute higher
    with pytest.raises(AttributeError):
        runtime.install_taylor_mlps(transformers.LlamaModel(_tiny_llama_config()), SPEC)  # base=False: no .model


@pytest.mark.parametrize("pieces", [None, 5])
@pytest.mark.parametrize("basis", BASES)
def test_forward_reads_nothing_back_from_an_accelerator(basis, pieces):
    """Off the CPU the forward never asks the device for a value (each ask stalls a layer until the device is done and
    rules out CUDA graphs): the meta device, which has no values to give, stands in for CUDA."""
    mlp = runtime.TaylorMLP("gated", 4, 2, 1, 3, basis, "silu", pieces=pieces).to("meta")
    with torch.no_grad():
        y = mlp(torch.zeros(2, 3, 4, device="meta"))
    assert y.shape == (2, 3, 4) and y.device.type == "meta"


def test_on_the_cpu_the_continuation_is_worked_only_when_an_input_is_outside(monkeypatch):
    mlp = runtime.TaylorMLP("plain", 2, 2, 0, 3, "taylor", "silu").double()  # plain: features are φ_n(t), no ⊙ u
    with torch.no_grad():
        mlp.gate.weight.copy_(torch.eye(2))
        mlp.z0.zero_()
        mlp.h.fill_(1.0)
    calls = []
    slopes = series_module.edge_slopes
    monkeypatch.setattr(series_module, "edge_slopes", lambda *a: calls.append(a) or slopes(*a))
    with torch.no_grad():
        inside = mlp.features(torch.tensor([[0.5, -0.5]], dtype=torch.float64))
        assert calls == []
        outside = mlp.features(torch.tensor([[2.0, -0.5]], dtype=torch.float64))
    assert calls == [("taylor", 3)]
    assert inside.shape == outside.shape and outside[0, 3 * 2].item() == 1.0 + 3.0 * 1.0  # t³ at 1, + 3·excess 1


@pytest.mark.parametrize("P,rows_per_block", [(1, 8), (3, 2), (8, 1), (20, 1)])
def test_on_the_cpu_the_basis_is_built_in_blocks_of_block_values(monkeypatch, P, rows_per_block):
    """series_basis walks the rows (tokens) in blocks of BLOCK // P rows (at least one), so that a block's
    intermediates stay in cache; every row is in exactly one block, and the values are those of one whole pass."""
    rows = 5
    tc = torch.linspace(-1, 1, rows * P, dtype=torch.float64).reshape(rows, P)
    excess, scale = torch.zeros_like(tc), torch.ones_like(tc)
    whole = series_module.series_basis(tc, excess, scale, 3, "chebyshev", torch.float64)
    blocks = []
    inner = series_module._basis_block
    monkeypatch.setattr(series_module, "BLOCK", 8)
    monkeypatch.setattr(series_module, "_basis_block", lambda tc, *a: blocks.append(tc.shape[0]) or inner(tc, *a))
    out = series_module.series_basis(tc, excess, scale, 3, "chebyshev", torch.float64)
    expected = [rows_per_block] * (rows // rows_per_block) + [rows % rows_per_block] * bool(rows % rows_per_block)
    assert blocks == expected and torch.equal(out, whole)
