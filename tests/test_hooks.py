"""hooks.py: a HookSet removes every hook it registered, swapped() puts every layer's own MLP back whatever happens."""

import pytest
import torch
from torch import nn

from taylormlp.common.hooks import HookSet, swapped


class Layer(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.mlp = nn.Linear(3, 3)
        self.k = k

    def forward(self, x):
        return self.mlp(x)


def _layers(n=3):
    return nn.ModuleList(Layer(k) for k in range(n))


def _hook_count(modules):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)


def test_hookset_runs_its_hooks_and_removes_every_one():
    layers = _layers()
    calls = []
    hooks = HookSet()
    for k, layer in enumerate(layers):
        hooks.pre(layer, lambda _m, _args, k=k: calls.append(("pre", k)))
        hooks.post(layer.mlp, lambda _m, _args, _out, k=k: calls.append(("post", k)))
    hooks.pre(layers[0], lambda _m, args, kwargs: calls.append(("kwargs", sorted(kwargs))), with_kwargs=True)
    assert _hook_count(layers.modules()) == 7 and len(hooks.handles) == 7
    x = torch.ones(1, 3)
    for layer in layers:
        layer(x)
    assert calls == [("pre", 0), ("kwargs", []), ("post", 0), ("pre", 1), ("post", 1), ("pre", 2), ("post", 2)]
    hooks.remove()
    assert _hook_count(layers.modules()) == 0 and hooks.handles == []
    calls.clear()
    for layer in layers:
        layer(x)
    assert calls == []
    hooks.remove()  # removing twice is harmless


def test_hookset_as_context_manager_removes_its_hooks_also_on_error_and_leaves_others():
    layer = Layer(0)
    foreign = layer.register_forward_hook(lambda *a: None)  # not the HookSet's: it stays
    with pytest.raises(ValueError, match="boom"):
        with HookSet() as hooks:
            hooks.post(layer, lambda *a: None)
            hooks.pre(layer.mlp, lambda *a: None)
            assert _hook_count(layer.modules()) == 3
            raise ValueError("boom")
    assert _hook_count(layer.modules()) == 1 and hooks.handles == []
    foreign.remove()
    with HookSet() as hooks:
        hooks.post(layer, lambda *a: None)
    assert _hook_count(layer.modules()) == 0


def test_a_hook_that_raises_is_still_removed():
    layer = Layer(0)

    def bad(*_):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        with HookSet() as hooks:
            hooks.pre(layer, bad)
            layer(torch.ones(1, 3))
    assert _hook_count(layer.modules()) == 0
    layer(torch.ones(1, 3))


def test_swapped_installs_and_restores_the_very_modules():
    layers = _layers()
    before = [layer.mlp for layer in layers]
    new = {0: nn.Identity(), 2: nn.Identity()}
    with swapped(layers, new):
        assert layers[0].mlp is new[0] and layers[2].mlp is new[2] and layers[1].mlp is before[1]
    assert all(layer.mlp is mlp for layer, mlp in zip(layers, before))


def test_swapped_restores_on_exception_and_undoes_swaps_made_inside():
    layers = _layers()
    before = [layer.mlp for layer in layers]
    with pytest.raises(KeyError):
        with swapped(layers, {1: nn.Identity()}):
            layers[2].mlp = nn.Identity()  # a layer the block was not given: its own MLP comes back too
            raise KeyError("inside")
    assert all(layer.mlp is mlp for layer, mlp in zip(layers, before))


def test_swapped_restores_when_installing_fails_half_way():
    layers = _layers(2)
    before = [layer.mlp for layer in layers]
    with pytest.raises(IndexError):
        with swapped(layers, {0: nn.Identity(), 5: nn.Identity()}):  # layer 0 is swapped, then 5 does not exist
            pass
    assert all(layer.mlp is mlp for layer, mlp in zip(layers, before))
