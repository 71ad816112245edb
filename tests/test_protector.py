"""The Protector on its own (not through protect_to_release): coverage masks, installing and restoring a coverage's
MLPs, applying it for good, the cost model against the built modules, and the all-rest build.

Tiny random models of every architecture (conftest.TINY_ARCHS), their gate weights spread so the pre-activations
span a few units (and random biases where the MLP has them), calibrated with collect_ranges on random token ids."""

import copy

import numpy as np
import pytest
import torch

from taylormlp import runtime
from taylormlp.protection.calibration import collect_ranges
from taylormlp.common.errors import TaylorMLPError
from taylormlp.protection.options import ProtectOptions
from taylormlp.protection.protector import CandidateMLP, Protector
from taylormlp.measure.cost import channel_work

from conftest import TINY_ARCHS, tiny

pytestmark = pytest.mark.usefixtures("one_thread")

COVERAGES = (0.0, 0.01, 0.25, 1 / 3, 0.5, 0.77, 0.999, 1.0)


def _spread(model):
    """Gate pre-activations a few units wide (random init leaves them near 0, where every activation is nearly
    linear), random gate and output biases where the MLP has them."""
    arch = runtime.architecture(model.config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in runtime.decoder_layers(model):
            gate, down = getattr(layer.mlp, arch["gate"]), getattr(layer.mlp, arch["down"])
            gate.weight.mul_(10.0)
            if gate.bias is not None:
                gate.bias.normal_(0, 0.5, generator=g)
            if down.bias is not None:
                down.bias.normal_(0, 0.1, generator=g)
    return model


def _ids():
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 128, (8, 32), generator=g)


@pytest.fixture(scope="module", params=list(TINY_ARCHS))
def base(request):
    """(architecture, model, ranges, calibration ids): the model is never modified by the tests."""
    model = _spread(tiny(request.param))
    ids = _ids()
    ranges = collect_ranges(model, list(ids))
    return request.param, model, ranges, ids


def _protector(model, ranges, **kw):
    return Protector(model, ranges, ProtectOptions(**kw).resolved())


def _mlps(model):
    return [layer.mlp for layer in runtime.decoder_layers(model)]


# ---------------------------------------------------------------- masks


def test_masks_select_round_coverage_channels_and_grow(base):
    name, model, ranges, _ = base
    p = _protector(model, ranges)
    sizes = [len(lo) for lo in ranges.lo]
    total = sum(sizes)
    assert p.total == total and p.sizes == sizes
    previous = None
    for c in COVERAGES:
        masks = p.masks(c)
        assert [m.shape for m in masks] == [(n,) for n in sizes] and all(m.dtype == bool for m in masks)
        flat = np.concatenate(masks)
        assert flat.sum() == round(c * total), (name, c)
        if previous is not None:
            assert not (previous & ~flat).any(), f"{name}: coverage {c} dropped a channel chosen at a smaller one"
        previous = flat
    assert previous.all()


def test_masks_take_the_easiest_channels_first(base):
    """selection "width": exactly the k narrowest calibrated ranges (read from the ranges, not the Protector);
    selection "error": no chosen channel scores worse than an unchosen one."""
    name, model, ranges, _ = base
    width = np.concatenate([hi - lo for lo, hi in zip(ranges.lo, ranges.hi)])
    assert (width > 1e-3).all() and len(np.unique(width)) == width.size  # no ties: the expected set is unique
    p = _protector(model, ranges, preset="paper")
    for c in COVERAGES:
        k = round(c * p.total)
        chosen = np.flatnonzero(np.concatenate(p.masks(c)))
        assert set(chosen) == set(np.argsort(width)[:k]), (name, c)
    p = _protector(model, ranges, preset="default")
    score = np.concatenate([plan.score for plan in p.plans])
    assert len(np.unique(score)) > 1
    for c in COVERAGES:
        chosen = np.concatenate(p.masks(c))
        if chosen.any() and not chosen.all():
            assert score[chosen].max() <= score[~chosen].min(), (name, c)


# ---------------------------------------------------------------- installed / apply


@pytest.mark.parametrize("coverage", [1.0, 0.5])
def test_installed_puts_taylor_mlps_in_and_the_originals_back(base, coverage):
    name, model, ranges, ids = base
    originals = _mlps(model)
    p = _protector(model, ranges)
    masks = p.masks(coverage)
    with torch.no_grad():
        ref = model(ids).logits
        with p.installed(coverage):
            inside = _mlps(model)
            assert all(isinstance(m, runtime.TaylorMLP) for m in inside), name
            assert [m.protected for m in inside] == [int(mask.sum()) for mask in masks]
            assert [m.rest is None for m in inside] == [bool(mask.all()) for mask in masks]
            got = model(ids).logits
        assert all(after is before for after, before in zip(_mlps(model), originals))
        assert torch.equal(model(ids).logits, ref)  # the originals, untouched
    assert not torch.equal(got, ref)  # the series did run inside


def test_candidates_when_streamed_or_not_materialized_give_the_same_output(base):
    name, model, ranges, ids = base
    originals = _mlps(model)
    p = _protector(model, ranges)
    with torch.no_grad():
        with p.installed(0.5):
            built = model(ids).logits
        with p.installed(0.5, materialize=False):
            assert all(type(m) is CandidateMLP for m in _mlps(model))
            candidate = model(ids).logits
        assert all(after is before for after, before in zip(_mlps(model), originals))
        streamed = Protector(model, ranges, ProtectOptions().resolved(), streamed=True)
        with streamed.installed(0.5):
            assert all(type(m) is CandidateMLP for m in _mlps(model))
            from_streamed = model(ids).logits
        with streamed.installed(0.5, materialize=True):
            assert all(type(m) is runtime.TaylorMLP for m in _mlps(model))
    assert all(after is before for after, before in zip(_mlps(model), originals))
    assert torch.equal(candidate, built) and torch.equal(from_streamed, built), name


def test_installed_only_some_layers(base):
    _, model, ranges, _ = base
    originals = _mlps(model)
    p = _protector(model, ranges)
    with p.installed(1.0, only={1}):
        inside = _mlps(model)
        assert inside[0] is originals[0] and isinstance(inside[1], runtime.TaylorMLP)
    assert all(after is before for after, before in zip(_mlps(model), originals))


def test_installed_restores_the_originals_when_the_body_raises(base):
    _, model, ranges, ids = base
    originals = _mlps(model)
    p = _protector(model, ranges)
    for materialize in (True, False):
        with pytest.raises(RuntimeError, match="inside"):
            with p.installed(1.0, materialize=materialize):
                assert all(not any(m is o for o in originals) for m in _mlps(model))
                raise RuntimeError("inside")
        assert all(after is before for after, before in zip(_mlps(model), originals))
    with pytest.raises(IndexError):  # a failure inside the forward itself
        with p.installed(1.0):
            model(torch.tensor([[10_000]]))
    assert all(after is before for after, before in zip(_mlps(model), originals))


def test_apply_at_full_coverage_keeps_the_model_output(base):
    """In-range inputs (the calibration ids themselves): the protected model's logits are the original's up to the
    series' approximation error, far below what the MLPs contribute."""
    name, model, ranges, ids = base
    model = copy.deepcopy(model)
    p = _protector(model, ranges)
    with torch.no_grad():
        ref = model(ids).logits
        masks = p.apply(1.0)
        assert all(m.all() for m in masks)
        layers = _mlps(model)
        assert all(isinstance(m, runtime.TaylorMLP) and m.rest is None for m in layers)
        got = model(ids).logits
        error = float((got - ref).abs().max())
        assert error < 1e-3, (name, error)
        for layer in runtime.decoder_layers(model):  # what the MLPs contribute: the tolerance can tell
            layer.mlp = _Zero()
        without = float((model(ids).logits - ref).abs().max())
    assert without > 100 * 1e-3, (name, without)


class _Zero(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def test_protector_refuses_a_model_whose_mlps_are_taylor_mlps_already(base):
    _, model, ranges, _ = base
    p = _protector(model, ranges)
    with p.installed(0.5, materialize=False):  # candidates count too
        with pytest.raises(TaylorMLPError, match="TaylorMLPs already"):
            _protector(model, ranges)
    released = copy.deepcopy(model)
    Protector(released, ranges, ProtectOptions().resolved()).apply(0.5)
    with pytest.raises(TaylorMLPError, match="TaylorMLPs already"):
        _protector(released, ranges)
    _protector(model, ranges)  # the original, restored, is accepted again


# ---------------------------------------------------------------- the cost model against the built modules


def test_channel_work_is_the_hand_count():
    q = np.array([1, 2, 3, 8])
    values, extra = channel_work(32, 8, q)
    assert values.tolist() == [32 * 9 * n for n in (1, 2, 3, 8)]
    assert extra.tolist() == [32 * (9 * n - 1) for n in (1, 2, 3, 8)]
    assert values.dtype == np.int64


@pytest.mark.parametrize("order", [4, 8])
def test_layer_and_channel_work_count_the_built_theta(base, order):
    """d·(N+1)·Q values of Θ and d·((N+1)·Q − P) extra multiply-adds per token, read off each built module's Θ."""
    name, model, ranges, _ = base
    p = _protector(model, ranges, order=order, max_pieces=8)
    assert any(plan.pieces_per_channel().max() > 1 for plan in p.plans)  # several pieces: q matters
    for c in (0.0, 0.3, 1.0):
        values, extra = p.layer_work(c)
        for i, mask in enumerate(p.masks(c)):
            module = p.build(i, mask)
            d, cols = module.theta.shape
            assert cols == (order + 1) * module.pieces and module.protected == int(mask.sum())
            assert values[i] == module.theta.numel() == d * (order + 1) * module.pieces, (name, c, i)
            assert extra[i] == d * ((order + 1) * module.pieces - module.protected), (name, c, i)
    values, extra = p.channel_work()
    assert values.shape == extra.shape == (p.total,)
    offsets = np.cumsum([0] + p.sizes)
    for i, n in enumerate(p.sizes):
        q = p.plans[i].pieces_per_channel()
        for j in np.unique(q, return_index=True)[1]:  # one channel of every piece count
            only = np.zeros(n, dtype=bool)
            only[j] = True
            module = p.build(i, only)
            d = module.theta.shape[0]
            assert values[offsets[i] + j] == module.theta.numel() == d * (order + 1) * module.pieces
            assert extra[offsets[i] + j] == d * ((order + 1) * module.pieces - 1)


# ---------------------------------------------------------------- build


def test_build_with_no_channel_protected_is_the_original_mlp_exactly(base):
    name, model, ranges, _ = base
    p = _protector(model, ranges)
    x = torch.randn(3, 5, model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd,
                    generator=torch.Generator().manual_seed(11)) * 3.0
    for i, original in enumerate(_mlps(model)):
        module = p.build(i, np.zeros(p.sizes[i], dtype=bool))
        assert isinstance(module, runtime.TaylorMLP) and module.protected == module.pieces == 0
        assert module.theta.numel() == 0 and module.rest is not None
        assert module.rest.down.in_features == p.sizes[i]  # every channel in `rest`
        assert module.theta.dtype == next(original.parameters()).dtype
        with torch.no_grad():
            assert torch.equal(module(x), original(x)), (name, i)
