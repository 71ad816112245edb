"""A model is a stream of layers: the one way taylormlp walks a model too large to hold.

* ``SafetensorsSource`` reads a Hugging Face model directory's tensors one layer at a time from its safetensors
  files (a memory map opened per read and closed right after, so nothing stays resident).  Headers are checked
  when the source is opened: a corrupt, truncated or mislabelled file is an error naming it, before any work.
* ``open_streamed`` builds the model with transformers' own ``from_pretrained(device_map=...)`` — embeddings,
  norms and head resident, every decoder layer offloaded to ``"disk"`` (its weights stay in the source files) —
  and then gives each decoder layer one hook that onloads all of the layer's tensors with a single read per file
  before the layer runs and drops them right after.  Generation, KV cache and batching work as in transformers;
  peak memory is one layer's weights plus activations, whatever the depth.

The same model object serves calibration (``calibration.RangeRecorder``), the original's continuations and
reference logits, and the coverage search's validation passes (``protector.CandidateMLP`` stands in for a
layer's MLP and builds its TaylorMLP from the source when called).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import runtime
from ..common.errors import TaylorMLPError, first_line
from ..common.files import read_json
from ..common.hooks import HookSet
from ..common.machine import keep_mmap_threshold
from .kinds import refuse_release
from .shards import check_safetensors_file


class SafetensorsSource:
    """Lazy, read-only access to the tensors of a model directory's safetensors files: the way every walk over a
    model's layers (streamed protect, streamed audit) reads them, so it also keeps glibc's mmap threshold fixed
    (machine.keep_mmap_threshold: peak memory flat in depth)."""

    def __init__(self, model_dir):
        keep_mmap_threshold()
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            fix = "re-download or re-save the model"
            weight_map = read_json(index, fix).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise TaylorMLPError(f"{index}: corrupt safetensors index (no weight_map of file names); {fix}")
            files = sorted(set(weight_map.values()))
        elif (self.dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            found = sorted(p.name for p in self.dir.glob("*.bin")) + sorted(p.name for p in self.dir.glob("*.pt*"))
            hint = f" (found {', '.join(found[:3])}: pickled weights, which taylormlp never loads)" if found else ""
            raise TaylorMLPError(f"{self.dir} holds no safetensors weights (model.safetensors or "
                                 f"model.safetensors.index.json){hint}; re-save the model with "
                                 f"save_pretrained(), which writes safetensors")
        self.location: dict[str, Path] = {}
        self.header: dict[str, tuple[str, tuple[int, ...]]] = {}  # name -> (safetensors dtype, shape), no data read
        for name in files:
            path = self.dir / name
            if not path.is_file():
                raise TaylorMLPError(f"weight file {path} is missing (named by {index.name}); re-download the model")
            for key, info in check_safetensors_file(path).items():
                self.location[key] = path
                self.header[key] = info

    def names(self) -> list[str]:
        return list(self.location)

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def read(self, names, dtype: torch.dtype | None = None, device="cpu") -> dict[str, torch.Tensor]:
        """{name: tensor} for `names`, one memory map per file, closed before returning.  Floating tensors are cast
        to `dtype` when given."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.location:
                raise TaylorMLPError(f"tensor {name!r} is not in the model's safetensors files under {self.dir}; "
                                     f"the checkpoint does not match its config.json")
            by_file.setdefault(self.location[name], []).append(name)
        out = {}
        for path, keys in by_file.items():
            try:
                with safe_open(path, framework="pt", device="cpu") as fh:
                    for key in keys:
                        t = fh.get_tensor(key)
                        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                            t = t.to(dtype)
                        out[key] = t.to(device) if str(device) != "cpu" else t
            except TaylorMLPError:
                raise
            except Exception as exc:  # noqa: BLE001 - any read failure names the file
                raise TaylorMLPError(f"{path}: cannot read tensor data ({exc}); re-download or re-convert it") from exc
        return out

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.read([name], dtype)[name]


# ---------------------------------------------------------------- the model's MLP weights, from anywhere


def mlp_tensor_names(arch: dict, layer: int) -> dict[str, str | None]:
    """Source tensor names of decoder layer `layer`'s MLP: V (gate), b, U (up), W (down), c."""
    prefix = f"{arch['layers']}.{layer}.mlp"
    return {"V": f"{prefix}.{arch['gate']}.weight", "b": f"{prefix}.{arch['gate']}.bias",
            "U": f"{prefix}.{arch['up']}.weight" if arch["up"] else None,
            "W": f"{prefix}.{arch['down']}.weight", "c": f"{prefix}.{arch['down']}.bias"}


class SourceMLPs:
    """MLP weights of a streamed model, read from its safetensors source layer by layer (in the file's dtype)."""

    def __init__(self, source: SafetensorsSource, config):
        self.source, self.arch = source, runtime.architecture(config)

    def tensors(self, layer: int) -> dict[str, torch.Tensor | None]:
        names = mlp_tensor_names(self.arch, layer)
        wanted = [n for n in names.values() if n is not None and n in self.source]
        got = self.source.read(wanted)
        out = {}
        for key, name in names.items():
            t = got.get(name) if name else None
            if t is not None and self.arch["conv1d"] and key in ("V", "U", "W"):
                t = t.t()  # GPT-2 Conv1D stores [in, out]
            out[key] = t
        for key in ("V", "W") + (("U",) if self.arch["up"] else ()):
            if out[key] is None:
                raise TaylorMLPError(f"layer {layer}: MLP weight {names[key]!r} missing from {self.source.dir}")
        return out


def module_mlp_tensors(mlp, arch: dict) -> dict[str, torch.Tensor | None]:
    """{"V", "b", "U", "W", "c"} of one MLP module held in memory, as float64 CPU copies."""
    gate, down = getattr(mlp, arch["gate"]), getattr(mlp, arch["down"])
    up = getattr(mlp, arch["up"]) if arch["up"] else None

    def f64(t):
        return None if t is None else t.detach().to("cpu", torch.float64)

    return {"V": f64(runtime.linear_weight(gate)), "b": f64(gate.bias),
            "U": f64(runtime.linear_weight(up)) if up is not None else None,
            "W": f64(runtime.linear_weight(down)), "c": f64(down.bias)}


class ModuleMLPs:
    """MLP weights of a model held in memory, read from its original MLP modules (float64 copies, per call)."""

    def __init__(self, model):
        self.arch = runtime.architecture(model.config)
        self.mlps = [layer.mlp for layer in runtime.decoder_layers(model)]

    def tensors(self, layer: int) -> dict[str, torch.Tensor | None]:
        return module_mlp_tensors(self.mlps[layer], self.arch)


# ---------------------------------------------------------------- the streamed model


def _device_map(config, n_layers: int, device: str) -> dict:
    """Everything but the decoder layers on `device`; every decoder layer on "disk"."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    path = runtime.architecture(config)["layers"].split(".")
    dm: dict[str, str] = {}
    module, prefix = skeleton, ""
    for part in path:
        for name, _child in module.named_children():
            if name != part:
                dm[prefix + name] = device
        module, prefix = getattr(module, part), prefix + part + "."
    for i in range(n_layers):
        dm[f"{prefix}{i}"] = "disk"
    return dm


class LayerOnloader(HookSet):
    """Hooks that onload a decoder layer's tensors from the source right before it runs and drop them after
    (``remove()`` takes them off again; the layers are then left on the meta device)."""

    def __init__(self, model, source: SafetensorsSource, dtype: torch.dtype, device):
        from accelerate.hooks import remove_hook_from_module

        super().__init__()
        self.source, self.dtype, self.device = source, dtype, torch.device(device)
        self.prefix = runtime.architecture(model.config)["layers"]
        self.layers = runtime.decoder_layers(model)
        for i, layer in enumerate(self.layers):
            remove_hook_from_module(layer, recurse=True)  # accelerate's per-tensor hooks: replaced by one per layer
            self._to_meta(layer)
            self.pre(layer, self._onload(i))
            self.post(layer, self._offload)

    @staticmethod
    def _tensors(layer):
        for name, _ in layer.named_parameters():
            yield name
        for mod_name, mod in layer.named_modules():
            for buf_name in mod._buffers:
                if buf_name not in mod._non_persistent_buffers_set and mod._buffers[buf_name] is not None:
                    yield f"{mod_name}.{buf_name}" if mod_name else buf_name

    def _to_meta(self, layer):
        from accelerate.utils import set_module_tensor_to_device

        for name in list(self._tensors(layer)):
            set_module_tensor_to_device(layer, name, "meta")

    def _onload(self, i):
        from accelerate.utils import set_module_tensor_to_device

        def hook(layer, _args):
            names = list(self._tensors(layer))
            values = self.source.read([f"{self.prefix}.{i}.{n}" for n in names], self.dtype)
            for name in names:
                set_module_tensor_to_device(layer, name, self.device, value=values[f"{self.prefix}.{i}.{name}"])
        return hook

    def _offload(self, layer, _args, _output):
        self._to_meta(layer)


def read_config(model_dir):
    """The model's transformers config, checked to be a supported architecture; errors name config.json."""
    from transformers import AutoConfig

    path = Path(model_dir) / "config.json"
    try:
        json.loads(path.read_text(encoding="utf-8"))
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as exc:
        raise TaylorMLPError(f"{path}: cannot read the model config ({first_line(exc)}); "
                             f"re-download or re-save the model") from exc
    if getattr(config, "taylormlp", None) is not None:  # its stock classes would build random MLPs
        refuse_release(model_dir)
    try:
        runtime.architecture(config)
    except ValueError as exc:
        raise TaylorMLPError(str(exc)) from exc
    return config


def open_streamed(model_dir, dtype: torch.dtype, device: str, offload_folder) -> tuple:
    """(model, source): the causal LM with resident embeddings/norm/head and decoder layers streamed from disk."""
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    config = read_config(model_dir)
    source = SafetensorsSource(model_dir)
    n_layers = int(getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer"))
    dm = _device_map(config, n_layers, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=dm,
                                                     offload_folder=str(offload_folder), use_safetensors=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise TaylorMLPError(f"could not load model from {model_dir}: {first_line(exc)}") from exc
    model.eval()
    for name, p in model.named_parameters():
        if not name.startswith(runtime.architecture(config)["layers"] + ".") and not torch.isfinite(p).all():
            raise TaylorMLPError(f"model weight {name} in {model_dir} contains NaN or Inf; the model is corrupt")
    model._taylormlp_onloader = LayerOnloader(model, source, dtype, device)
    return model, source


