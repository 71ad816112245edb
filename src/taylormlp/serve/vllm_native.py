"""Releases as native vLLM models: vLLM's own model class with every decoder layer's MLP a TaylorMLP of vLLM layers.

taylormlp's vLLM plugin (vllm_plugin.py) registers one class per architecture the runtime's table gives a vLLM class
(``ARCHITECTURES[...]["vllm"]``: Llama, Mistral, Qwen2), named as a release names itself in config.json
(``TaylorMLPLlamaForCausalLM``, runtime.release_architectures).  Each is that vLLM class (its attention, rotary
embedding, norms, embeddings, head, torch.compile and CUDA graphs) whose decoder layers get a ``VllmTaylorMLP``:

    gate, up   one MergedColumnParallelLinear: rank r computes z and u of its own protected channels
    series     runtime.select_pieces / piece_coordinates / stacked_features, the runtime's own maths, on those channels'
               pieces; Θ a RowParallelLinear over the stacked features, each rank holding the columns of its pieces
    rest       the unprotected channels as vLLM's MLP is split: gate/up column-parallel, down row-parallel
    output     series + rest on each rank, then one all-reduce (as vLLM's down_proj does)

Channels are split evenly (padded with zero rows where the count does not divide); a channel's pieces go with it
(a release stores pieces sorted by channel, so each rank's pieces are one contiguous run, found when the release's
``owner`` index is loaded).  The series' precision on a bfloat16 engine is SERIES_DTYPE_ENV's choice (SERIES_DTYPES):
z0 and h (which set t = (z − z0)/h, where rounding costs most) and the basis are float32 in every mode; Θ and the
one stacked matmul are the engine's dtype by default ("mixed": the series reads the bytes the backend's does), float32
with "float32" (twice the bytes, a float32 GEMM), and "auto" keeps z0 and h in the engine's dtype too.  What each
costs in agreement and speed is measured in docs/serving.md.
"""

from __future__ import annotations

import importlib
import inspect
import os

import torch
from torch import nn
from vllm.distributed import (get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size,
                              tensor_model_parallel_all_reduce)
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from vllm.model_executor.models.utils import PPMissingLayer, extract_layer_index

from .. import runtime

SERIES_DTYPE_ENV = "TAYLORMLP_VLLM_SERIES_DTYPE"
SERIES_DTYPES = ("mixed", "float32", "auto")  # the first is the default; see series_dtypes


def series_dtypes() -> tuple[torch.dtype, torch.dtype]:
    """(dtype of z0 and h, dtype of Θ and its matmul) under SERIES_DTYPE_ENV: mixed (default) float32 and the engine's,
    float32 both float32, auto both the engine's (vLLM builds a model under its dtype as torch's default)."""
    value = os.environ.get(SERIES_DTYPE_ENV, SERIES_DTYPES[0])
    if value not in SERIES_DTYPES:
        raise ValueError(f"{SERIES_DTYPE_ENV}={value!r}: use one of {', '.join(SERIES_DTYPES)} (default "
                         f"{SERIES_DTYPES[0]}: z0 and h float32, Θ in the engine's dtype)")
    engine = torch.get_default_dtype()
    return {"mixed": (torch.float32, engine), "float32": (torch.float32, torch.float32),
            "auto": (engine, engine)}[value]


def even_share(total: int, ranks: int, rank: int) -> tuple[int, int, int]:
    """(padded size per rank, first, end) of ``rank``'s share of ``total`` rows split evenly over ``ranks``, the last
    shares padded: rank r holds rows [first, end) of the real ones, and ``per - (end - first)`` zero rows."""
    per = -(-total // ranks)
    first = min(rank * per, total)
    return per, first, min(first + per, total)


def _pad_rows(weight: torch.Tensor, rows: int, dim: int = 0) -> torch.Tensor:
    """``weight`` with zero rows (dim 0) or columns (dim 1) appended up to ``rows``."""
    missing = rows - weight.shape[dim]
    if missing == 0:
        return weight
    shape = list(weight.shape)
    shape[dim] = missing
    return torch.cat([weight, weight.new_zeros(shape)], dim=dim)


def _load_gate_up(linear: MergedColumnParallelLinear, gate: torch.Tensor, up: torch.Tensor, rows: int) -> None:
    """Whole gate and up weights into a MergedColumnParallelLinear of ``rows`` outputs each, padded with zero rows,
    through vLLM's own loader (each rank takes its share)."""
    linear.weight.weight_loader(linear.weight, _pad_rows(gate, rows), 0)
    linear.weight.weight_loader(linear.weight, _pad_rows(up, rows), 1)


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    """Give ``param`` (a parameter or buffer whose size the checkpoint decides) ``value``, in param's dtype/device."""
    param.data = value.to(dtype=param.dtype, device=param.device).contiguous()


class VllmRestMLP(nn.Module):
    """The unprotected channels, split like vLLM's own MLP: act(gate x) ⊙ up x, then down (not reduced here)."""

    def __init__(self, hidden: int, channels: int, act: str, out_bias: bool, quant_config, prefix: str):
        super().__init__()
        self.per, _, _ = even_share(channels, get_tensor_model_parallel_world_size(),
                                    get_tensor_model_parallel_rank())
        padded = self.per * get_tensor_model_parallel_world_size()
        self.gate_up = MergedColumnParallelLinear(hidden, [padded] * 2, bias=False, quant_config=quant_config,
                                                  prefix=f"{prefix}.gate_up")
        self.down = RowParallelLinear(padded, hidden, bias=out_bias, reduce_results=False, quant_config=quant_config,
                                      prefix=f"{prefix}.down")
        self.act = runtime.torch_activation(act)  # the runtime's, bit for bit

    def load(self, tensors: dict) -> None:
        padded = self.per * get_tensor_model_parallel_world_size()
        _load_gate_up(self.gate_up, tensors["gate.weight"], tensors["up.weight"], padded)
        self.down.weight.weight_loader(self.down.weight, _pad_rows(tensors["down.weight"], padded, dim=1))
        if self.down.bias is not None:
            self.down.bias.weight_loader(self.down.bias, tensors["down.bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)[0].split(self.per, dim=-1)
        return self.down(self.act(gate) * up)[0]


class VllmTaylorMLP(nn.Module):
    """One decoder layer's TaylorMLP on vLLM (a gated MLP), split over the tensor-parallel ranks by channel."""

    def __init__(self, spec: runtime.ReleaseSpec, shape: runtime.LayerShape, quant_config=None, prefix: str = ""):
        super().__init__()
        if spec.family != "gated" or spec.rest_bias:
            raise ValueError(f"taylormlp's vLLM model runs gated MLPs without gate biases (this release: {spec.family}"
                             f", rest_bias={spec.rest_bias}); run it with --model-impl transformers --trust-remote-code")
        self.ranks, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        self.hidden, self.order, self.basis = spec.hidden_size, spec.order, spec.basis
        self.protected, self.pieces = shape.protected, shape.pieces or shape.protected
        coords, self.dtype = series_dtypes()  # z0/h's dtype; Θ's and its matmul's
        self.piecewise = self.pieces > self.protected
        self.per, first, end = even_share(self.protected, self.ranks, rank)
        self.channels = (first, end)  # this rank's protected channels
        self.local = end - first  # its real ones (the rest of `per` are zero padding); pieces: set on load
        self.series_bytes = self.whole_series_bytes = 0  # this rank's series tensors and the whole layer's (on load)
        self._pending: dict[str, torch.Tensor] = {}
        if self.protected:
            self.gate_up = MergedColumnParallelLinear(self.hidden, [self.per * self.ranks] * 2, bias=False,
                                                      quant_config=quant_config, prefix=f"{prefix}.gate_up")
            guess = self.per if not self.piecewise else -(-self.pieces // self.ranks)  # the checkpoint decides
            self.theta = RowParallelLinear((self.order + 1) * guess * self.ranks, self.hidden, bias=False,
                                           params_dtype=self.dtype, reduce_results=False, prefix=f"{prefix}.theta")
            self.z0 = nn.Parameter(torch.zeros(guess, dtype=coords), requires_grad=False)
            self.h = nn.Parameter(torch.ones(guess, dtype=coords), requires_grad=False)
            if self.piecewise:  # this rank's pieces: which of its channels each reads, and where each is live
                self.register_buffer("owner", torch.zeros(guess, dtype=torch.long))
                self.register_buffer("edge_lo", torch.zeros(guess, dtype=torch.float32))
                self.register_buffer("edge_hi", torch.zeros(guess, dtype=torch.float32))
        self.rest = (VllmRestMLP(self.hidden, shape.rest, spec.activation, shape.rest_out_bias, quant_config,
                                 f"{prefix}.rest") if shape.rest else None)
        self.expected = self._checkpoint_names(shape)

    def _checkpoint_names(self, shape: runtime.LayerShape) -> set[str]:
        """The names under ``...mlp.`` that the release holds for this layer (runtime.TaylorMLP's state dict: a layer
        with no protected channel holds empty series tensors)."""
        names = {"gate.weight", "up.weight", "z0", "h", "theta"}
        names |= {"owner", "edge_lo", "edge_hi"} if self.piecewise else set()
        names |= {"rest.gate.weight", "rest.up.weight", "rest.down.weight"} if shape.rest else set()
        return names | ({"rest.down.bias"} if shape.rest and shape.rest_out_bias else set())

    def load_weights(self, weights) -> set[str]:
        """vLLM's AutoWeightsLoader hands this module its checkpoint tensors (names relative to ``mlp.``); they are
        kept until the layer's last one arrives (the pieces' index decides what each rank takes), then split."""
        for name, tensor in weights:
            if name not in self.expected:
                raise ValueError(f"unexpected tensor mlp.{name} in a TaylorMLP layer: a damaged release?")
            self._pending[name] = tensor
        if set(self._pending) != self.expected:
            return set()
        tensors, self._pending = self._pending, {}
        if self.protected:
            self._load_series(tensors)
        if self.rest is not None:
            self.rest.load({k[5:]: v for k, v in tensors.items() if k.startswith("rest.")})
        return {name for name, _ in self.named_parameters()}

    def _load_series(self, tensors: dict) -> None:
        first, end = self.channels
        _load_gate_up(self.gate_up, tensors["gate.weight"], tensors["up.weight"], self.per * self.ranks)
        whole = tensors["z0"].numel()
        if self.piecewise:
            owner = tensors["owner"].long()
            if bool((owner[1:] < owner[:-1]).any()):
                raise ValueError("the release's pieces are not sorted by channel (owner); vLLM's model cannot split "
                                 "them over ranks: re-protect with this taylormlp")
            q0, q1 = (int(i) for i in torch.searchsorted(owner, torch.tensor([first, end])))
            _set(self.owner, owner[q0:q1] - first)
            _set(self.edge_lo, tensors["edge_lo"][q0:q1])
            _set(self.edge_hi, tensors["edge_hi"][q0:q1])
        else:
            q0, q1 = first, end
        self.local = q1 - q0  # pieces on this rank
        _set(self.z0, tensors["z0"][q0:q1])
        _set(self.h, tensors["h"][q0:q1])
        theta = tensors["theta"].reshape(self.hidden, self.order + 1, whole)[:, :, q0:q1].reshape(self.hidden, -1)
        # a rank with no piece of a narrow layer keeps one zero column (vLLM's CPU GEMM faults on a zero-width
        # weight) and skips the series in forward
        _set(self.theta.weight, theta if self.local else theta.new_zeros(self.hidden, 1))
        series = [self.theta.weight, self.z0, self.h] + ([self.owner, self.edge_lo, self.edge_hi]
                                                         if self.piecewise else [])
        self.series_bytes = sum(t.numel() * t.element_size() for t in series) if self.local else 0
        self.whole_series_bytes = sum(tensors[k].numel() * t.element_size() for k, t in
                                      zip(("theta", "z0", "h", "owner", "edge_lo", "edge_hi"), series))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None
        if self.protected and self.local:  # a rank may hold no piece of a narrow layer
            z, u = self.gate_up(x)[0].split(self.per, dim=-1)
            index = (self.owner, self.edge_lo, self.edge_hi) if self.piecewise else None
            if index is None and self.local < self.per:  # one piece per channel: drop the padding
                z, u = z[..., :self.local], u[..., :self.local]
            z, u, active = runtime.select_pieces(z, u, index)
            tc, excess = runtime.piece_coordinates(z, self.z0, self.h)
            y = self.theta(runtime.stacked_features(tc, excess, u, active, self.order, self.basis, self.dtype))[0]
        if self.rest is not None:
            rest = self.rest(x)
            y = rest if y is None else y + rest.to(y.dtype)  # summed in the series' dtype, rounded once
        y = torch.zeros_like(x) if y is None else y.to(x.dtype)
        return tensor_model_parallel_all_reduce(y) if self.ranks > 1 else y


def taylor_mlp(vllm_config, prefix: str) -> VllmTaylorMLP:
    """The VllmTaylorMLP of the decoder layer at ``prefix`` (``...layers.<i>``), shaped as the release's spec."""
    spec = runtime.ReleaseSpec.from_dict(vllm_config.model_config.hf_config.taylormlp)
    return VllmTaylorMLP(spec, spec.layers[extract_layer_index(prefix)], vllm_config.quant_config, f"{prefix}.mlp")


def _taylor_layer(base: type) -> type:
    """``base`` (vLLM's decoder layer class) with its MLP replaced by the layer's VllmTaylorMLP as it is built."""

    def __init__(self, vllm_config, prefix: str = "", **kwargs):
        base.__init__(self, vllm_config=vllm_config, prefix=prefix, **kwargs)
        self.mlp = taylor_mlp(vllm_config, prefix)

    return type("TaylorMLP" + base.__name__, (base,), {"__init__": __init__})


def release_model_class(entry: dict) -> type:
    """TaylorMLP<vLLM class> for one row of runtime.ARCHITECTURES: vLLM's class with the release's activation put
    back on the config (runtime.unmasked_spec) and a VllmTaylorMLP in every decoder layer: through the class's
    ``layer_type`` where it takes one (each layer built with its TaylorMLP), else swapped in once the model is built."""
    module_name, class_name = entry["vllm"].split(":")
    parent = getattr(importlib.import_module(module_name), class_name)
    layer_type = inspect.signature(parent.__init__).parameters.get("layer_type")

    def __init__(self, *, vllm_config, prefix: str = ""):
        runtime.unmasked_spec(vllm_config.model_config.hf_config)
        if layer_type is not None:
            parent.__init__(self, vllm_config=vllm_config, prefix=prefix, layer_type=_taylor_layer(layer_type.default))
            return
        parent.__init__(self, vllm_config=vllm_config, prefix=prefix)
        for i, layer in enumerate(self.model.layers):
            if not isinstance(layer, PPMissingLayer):
                layer.mlp = taylor_mlp(vllm_config, f"{prefix + '.' if prefix else ''}model.layers.{i}")

    return type(runtime.architecture_name(entry), (parent,), {"__init__": __init__, "__module__": __name__})


for _entry in runtime.ARCHITECTURES.values():
    if _entry["vllm"]:
        globals()[runtime.architecture_name(_entry)] = release_model_class(_entry)
