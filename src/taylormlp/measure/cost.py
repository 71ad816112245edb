"""The cost model, in one place: the work a decode step does, counted without a clock.

* per channel (`channel_work`): a protected channel with q pieces replaces one down-projection column by
  (N+1)·q columns of Θ, so it adds d·((N+1)·q − 1) multiply-adds (and as many values read) per decoded token;
* per model: matmul FLOPs of one token's forward (`flops_per_token`) and parameter bytes read per decode step
  (`parameter_bytes_read`);
* per setting (`WorkModel`): the FLOPs and bytes ratios of every coverage of one protector (channels taken easiest
  first), what `--slowdown` predicts with before it measures;
* per operator (`WorkCounter`, `step_work`): bytes, FLOPs and kernels of one cached decode step, counted under a
  TorchDispatchMode, that measure/predict.py turns into a GPU roofline.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from ..runtime import TaylorMLP
from .decode import input_device, one_step


def channel_work(hidden: int, order: int, pieces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The throttle's cost model, per channel with q pieces were it protected: d·(N+1)·q values of Θ, and
    d·((N+1)·q − 1) multiply-adds per token on top of the original MLP (the N+1 stacked columns of every piece
    replace the channel's one down-projection column; gated and plain MLPs alike)."""
    values = hidden * (order + 1) * np.asarray(pieces, dtype=np.int64)
    return values, values - hidden


@torch.no_grad()
def flops_per_token(model, token_id: int = 0) -> int:
    """Matmul FLOPs of one single-token forward (no cache), counted by FlopCounterMode."""
    return forward_flops(model, [int(token_id)])


def forward_flops(model, token_ids) -> int:
    """Matmul FLOPs of one forward (no cache) on the sequence `token_ids` (a prefill), counted by FlopCounterMode."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(1, -1).to(input_device(model))
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    except AssertionError:  # torch's SDPA FLOP formula rejects grouped-query shapes (torch 2.11 on cuda): count eager
        counter = FlopCounterMode(display=False)
        previous = model.config._attn_implementation
        model.set_attn_implementation("eager")
        try:
            with counter:
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        finally:
            model.set_attn_implementation(previous)
    return int(counter.get_total_flops())


def taylor_mlps(model) -> list:
    return [m for m in model.modules() if isinstance(m, TaylorMLP)]


def weights_bytes(model) -> int:
    params = {id(p): p.numel() * p.element_size() for p in model.parameters()}  # tied weights once
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return int(sum(params.values()) + buffers)


def parameter_bytes_read(model) -> int:
    """Bytes of parameters one decode step reads: every parameter once (tied weights once), except the input
    embeddings, of which a step reads one row per sequence (counted when the output layer shares them).  Per decoded
    token at batch 1; a batch of B shares one read (the memory-bound cost of a small batch)."""
    params = {id(p): p.numel() * p.element_size() for p in model.parameters()}
    embed = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    if output is None or output.weight is not embed:
        params.pop(id(embed), None)
    return int(sum(params.values()))


def series_feature_bytes_per_token(model) -> int:
    """Bytes of the largest layer's stacked basis features for one token ((N+1)·P float32 values)."""
    sizes = [(m.order + 1) * m.pieces * 4 for m in taylor_mlps(model)]
    return max(sizes, default=0)


class WorkModel:
    """Predicted FLOPs ratio of every coverage of one Protector (its family of pieces and its order), and its bytes
    ratio: parameter bytes read per decoded token over the original's `base_bytes` (bench.parameter_bytes_read).
    A channel's extra multiply-adds are also its extra parameter values read (its N+1 columns per piece replace one
    column of W), so the two ratios differ by their denominators: the original's FLOPs count attention over the
    context too, its bytes only the weights."""

    def __init__(self, protector, base_flops: float, base_bytes: float | None = None):
        values, extra = protector.channel_work()  # protector.channel_work: d·(N+1)·q and d·((N+1)·q − 1)
        ranked = protector.order_index  # easiest channels first
        self.cumulative = np.concatenate([[0.0], np.cumsum(2.0 * extra[ranked])]) / float(base_flops)
        self.extra_values = np.concatenate([[0], np.cumsum(extra[ranked])])
        self.base_bytes, self.itemsize = base_bytes, protector.dtype.itemsize
        self.total = protector.total
        self.theta_values = np.concatenate([[0], np.cumsum(values[ranked])])

    def ratio(self, coverage: float) -> float:
        return 1.0 + float(self.cumulative[int(round(coverage * self.total))])

    def bytes_ratio(self, coverage: float) -> float | None:
        if not self.base_bytes:
            return None
        return 1.0 + float(self.extra_values[int(round(coverage * self.total))]) * self.itemsize / self.base_bytes

    def max_coverage(self, ratio_cap: float) -> float:
        """Largest coverage whose predicted FLOPs ratio is at most ratio_cap."""
        k = int(np.searchsorted(self.cumulative, ratio_cap - 1.0, side="right")) - 1
        return max(k, 0) / self.total

    def theta_size(self, coverage: float) -> int:
        return int(self.theta_values[int(round(coverage * self.total))])


NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
             "alias", "_unsafe_view", "_local_scalar_dense", "is_nonzero", "item", "sym_size", "sym_stride", "sym_numel"}


SYNC = {"_local_scalar_dense", "is_nonzero", "item"}


LOOKUP = {"embedding", "index", "index_select", "gather"}


def _bytes(t: torch.Tensor) -> int:
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


def _unique(items) -> list[torch.Tensor]:
    """The tensors among `items`, each once (an in-place operator's tensor is read as an input and written as its
    output: twice in all)."""
    return list({id(t): t for t in items if isinstance(t, torch.Tensor)}.values())


def _is_view(func) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def _op_flops(func, args, kwargs, out) -> tuple[int, bool]:
    """(FLOPs, is a matmul) of one operator."""
    packet = func._overloadpacket
    if packet in flop_registry:
        return int(flop_registry[packet](*args, **kwargs, out_val=out)), True
    name = packet.__name__
    if "scaled_dot_product" in name:  # attention kernels the flop counter does not know (CPU's flash attention)
        q, k = args[0], args[1]
        return 4 * q.shape[:-1].numel() * k.shape[-2] * q.shape[-1], True
    outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    return sum(t.numel() for t in outs), False


class WorkCounter(TorchDispatchMode):
    """Counts every operator's bytes, FLOPs and kernel in its block (see the module docstring); `ops` keeps one
    (name, bytes, FLOPs, matmul dtype or None) per kernel."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, int, int, torch.dtype | None]] = []
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._overloadpacket.__name__
        if name in SYNC:
            self.syncs += 1
        outputs = _unique(tree_flatten(out)[0])
        if name in NO_KERNEL or _is_view(func) or not outputs:
            return out
        inputs = _unique(tree_flatten((args, {k: v for k, v in kwargs.items() if k != "out"}))[0])
        written = sum(_bytes(t) for t in outputs)
        if name in LOOKUP:  # reads the rows it returns, not the whole table
            inputs = inputs[1:]  # the table is the first tensor (the indices follow): counted as the rows returned
            written *= 2
        moved = sum(_bytes(t) for t in inputs) + written
        flops, matmul = _op_flops(func, args, kwargs, out)
        dtype = next((t.dtype for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)), None) if matmul else None
        self.ops.append((name, moved, flops, dtype if matmul else None))
        return out


def step_work(model, prompt_ids, batch: int) -> dict:
    """Machine-independent work of one decode step at `batch` after `prompt_ids`: the counted operators and their
    totals {"bytes", "flops", "matmul_flops", "kernels", "syncs", "ops"}."""
    counter = WorkCounter()
    one_step(model, prompt_ids, batch, around=counter)
    return {"batch": batch, "bytes": sum(o[1] for o in counter.ops), "flops": sum(o[2] for o in counter.ops),
            "matmul_flops": sum(o[2] for o in counter.ops if o[3] is not None), "kernels": len(counter.ops),
            "syncs": counter.syncs, "ops": counter.ops}
