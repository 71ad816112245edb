"""The one owner of hooks and module swaps: whatever is installed in a model is removed or restored on the way out.

* ``HookSet``: forward (pre-)hooks registered together and removed together (a context manager, or ``remove()``),
  in the spirit of llm-compressor's HooksMixin.  Range recording, layer onloading and the audit's input capture
  use it.
* ``swapped(layers, mlps)``: layer i's ``.mlp`` is ``mlps[i]`` inside the block and every layer's own MLP is back
  afterwards, whatever happens inside (candidate TaylorMLPs while a coverage is validated or timed).
"""

from __future__ import annotations

import contextlib


class HookSet:
    """Hooks on any modules, removed all at once."""

    def __init__(self):
        self.handles: list = []

    def pre(self, module, fn, **kwargs) -> None:
        self.handles.append(module.register_forward_pre_hook(fn, **kwargs))

    def post(self, module, fn, **kwargs) -> None:
        self.handles.append(module.register_forward_hook(fn, **kwargs))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def __enter__(self) -> "HookSet":
        return self

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False


@contextlib.contextmanager
def swapped(layers, mlps: dict):
    """Install `mlps` ({layer index: module}) as those decoder layers' ``.mlp``; restore every layer's MLP after."""
    before = [layer.mlp for layer in layers]
    try:
        for i, mlp in mlps.items():
            layers[i].mlp = mlp
        yield
    finally:
        for layer, mlp in zip(layers, before):
            layer.mlp = mlp
