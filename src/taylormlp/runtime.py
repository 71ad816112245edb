"""TaylorMLP runtime: the release format (the typed spec of config.json's ``taylormlp`` section, the masked
activation), the architecture table, and the classes that load a release with its MLPs replaced by TaylorMLPs.

This file and the module it imports (series_module.py: the TaylorMLP module, the series evaluation) are
self-contained (they import only torch, transformers and each other): `save_release` copies them verbatim into every
release, this one as ``modeling_taylormlp.py``, so that ``from_pretrained(DIR, trust_remote_code=True)`` and vLLM's
Transformers backend run exactly this code (transformers copies a remote module's relative imports with it).  There
is one implementation, not two.  Releases written before the split carry one file (this one with the module inside)
and load as they are.
"""

from __future__ import annotations

import copy
from dataclasses import MISSING, asdict, dataclass, field, fields

import torch
import transformers
from torch import nn

from .series_module import (  # noqa: F401  (also the runtime's names: taylormlp.runtime.TaylorMLP, ...)
    BASES, RestMLP, TaylorMLP, edge_slopes, piece_coordinates, piece_inputs, select_pieces, stacked_features,
    torch_activation)

FORMAT_VERSION = 2  # 2: config.json masks the activation (LOAD_NOTICE) so that stock loaders refuse the release
READABLE_FORMATS = (1, 2)
# A release's config.json holds this in place of its activation names, so a stock class of the base architecture
# (AutoModelForCausalLM without trust_remote_code, LlamaForCausalLM, `transformers serve`) fails in its ACT2FN lookup
# with this text instead of loading random MLPs; the release classes put the real names (ReleaseSpec.masked) back.
LOAD_NOTICE = ("this is a TaylorMLP release, not a stock model: load it with taylormlp.load_release(DIR) or "
               "AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True); on vLLM, install taylormlp beside "
               "vLLM (pip install taylormlp: its plugin runs Llama, Mistral and Qwen2 releases natively) or add "
               "--model-impl transformers --trust-remote-code")
ACTIVATION_KEYS = ("hidden_act", "hidden_activation", "activation_function")  # every name a stock MLP may read

# ---------------------------------------------------------------- architecture table (the one place)
# family "gated": y = W_down(act(W_gate x) * W_up x)    family "plain": y = W act(V x + b) + c
# Each entry: where the decoder layers live, the MLP attribute, the names of its linear maps, whether the linears are
# GPT-2 Conv1D ([in, out] weights), which config key names the activation, the transformers classes of the causal LM
# and of its base model (what AutoModel builds), and the vLLM class ("module:Class") that taylormlp's vLLM plugin builds
# a release on (None: the release runs on vLLM's Transformers backend only).
_GATED = dict(family="gated", layers="model.layers", gate="gate_proj", up="up_proj", down="down_proj",
              act_key="hidden_act", conv1d=False, vllm=None)  # the Llama-style MLP: down(act(gate(x)) * up(x))
_VLLM = "vllm.model_executor.models."
ARCHITECTURES = {  # one row per supported model type
    "llama": {**_GATED, "model_class": "LlamaForCausalLM", "base_class": "LlamaModel",
              "vllm": _VLLM + "llama:LlamaForCausalLM"},
    "mistral": {**_GATED, "model_class": "MistralForCausalLM", "base_class": "MistralModel",
                "vllm": _VLLM + "mistral:MistralForCausalLM"},
    "qwen2": {**_GATED, "model_class": "Qwen2ForCausalLM", "base_class": "Qwen2Model",
              "vllm": _VLLM + "qwen2:Qwen2ForCausalLM"},
    "gemma": {**_GATED, "act_key": "hidden_activation", "model_class": "GemmaForCausalLM", "base_class": "GemmaModel"},
    "gemma2": {**_GATED, "act_key": "hidden_activation", "model_class": "Gemma2ForCausalLM",
               "base_class": "Gemma2Model"},
    "gemma3_text": {**_GATED, "act_key": "hidden_activation", "model_class": "Gemma3ForCausalLM",
                    "base_class": "Gemma3TextModel"},
    "phi": dict(family="plain", layers="model.layers", gate="fc1", up=None, down="fc2", act_key="hidden_act",
                conv1d=False, model_class="PhiForCausalLM", base_class="PhiModel", vllm=None),
    "gpt2": dict(family="plain", layers="transformer.h", gate="c_fc", up=None, down="c_proj",
                 act_key="activation_function", conv1d=True, model_class="GPT2LMHeadModel", base_class="GPT2Model",
                 vllm=None),
}


def architecture(config) -> dict:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"unsupported architecture {model_type!r}; supported model types: {supported}")
    return ARCHITECTURES[model_type]


def activation_name(config) -> str:
    arch = architecture(config)
    name = getattr(config, arch["act_key"], None)
    if name is None and arch["act_key"] == "hidden_activation":  # old Gemma configs
        name = getattr(config, "hidden_act", None)
    return name


def decoder_layers(model, base: bool = False) -> nn.ModuleList:
    """The decoder layers of a causal LM (base=True: of its base model, which holds them one attribute higher)."""
    parts = architecture(model.config)["layers"].split(".")
    obj = model
    for part in parts[1:] if base else parts:
        obj = getattr(obj, part)
    return obj


def linear_weight(module) -> torch.Tensor:
    """[out, in] weight of an nn.Linear or a GPT-2 Conv1D."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


# ---------------------------------------------------------------- installing empty modules (for loading)


@dataclass
class LayerShape:
    """One decoder layer of a release: protected channels, their series pieces, and the plain ``rest`` channels."""

    protected: int
    rest: int
    pieces: int | None = None  # None: one piece per protected channel
    rest_out_bias: bool = False


@dataclass
class ReleaseSpec:
    """The ``taylormlp`` section of a release's config.json, typed: what the runtime needs to rebuild the empty
    TaylorMLPs, and what protect recorded (calibration, validation, coverage search, slowdown) in ``record``.
    ``from_dict`` is the one place a spec's format_version is checked."""

    family: str
    hidden_size: int
    activation: str
    order: int
    basis: str
    coverage: float
    layers: list
    rest_bias: bool = False
    preset: str | None = None
    selection: str | None = None
    margin: float | None = None
    max_pieces: int | None = None
    masked: dict = field(default_factory=dict)  # format 2: config keys config.json holds as LOAD_NOTICE -> real values
    record: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        out = {"format_version": self.format_version}
        for f in fields(self):
            if f.name not in ("format_version", "record", "layers"):
                out[f.name] = getattr(self, f.name)
        out["layers"] = [asdict(shape) if isinstance(shape, LayerShape) else dict(shape) for shape in self.layers]
        return {**out, **self.record}

    @classmethod
    def from_dict(cls, spec) -> "ReleaseSpec":
        if not isinstance(spec, dict):
            raise ValueError("config.json has no 'taylormlp' section: this is not a taylormlp release")
        version = spec.get("format_version")
        if version not in READABLE_FORMATS:
            raise ValueError(f"unknown taylormlp format_version {version!r}; this runtime reads versions "
                             f"{' and '.join(map(str, READABLE_FORMATS))} (a release from another taylormlp version?)")
        names = {f.name for f in fields(cls)} - {"record", "layers"}
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        absent = [name for name in required if name not in spec]
        if absent:
            raise ValueError(f"the taylormlp section of config.json lacks {', '.join(absent)}: a damaged release")
        try:
            layers = [LayerShape(**{k: row[k] for k in ("protected", "rest", "pieces", "rest_out_bias") if k in row})
                      for row in spec["layers"]]
        except (TypeError, KeyError) as exc:
            raise ValueError(f"the taylormlp section's layers are malformed ({exc}): a damaged release") from exc
        known = {k: v for k, v in spec.items() if k in names}
        if not isinstance(known.get("masked", {}), dict):
            raise ValueError("the taylormlp section's masked keys are not a dict: a damaged release")
        record = {k: v for k, v in spec.items() if k not in names and k != "layers"}
        return cls(**known, layers=layers, record=record)


def install_taylor_mlps(model, spec: ReleaseSpec | dict, base: bool = False) -> None:
    """Replace every decoder layer's MLP by an empty TaylorMLP shaped as ``spec`` (config["taylormlp"]); ``base``:
    ``model`` is the base model (LlamaModel, ...), not the causal LM."""
    spec = spec if isinstance(spec, ReleaseSpec) else ReleaseSpec.from_dict(spec)
    layers = decoder_layers(model, base)
    if len(spec.layers) != len(layers):
        raise ValueError(f"release describes {len(spec.layers)} layers, the model has {len(layers)}")
    for layer, shape in zip(layers, spec.layers):
        layer.mlp = TaylorMLP(spec.family, spec.hidden_size, shape.protected, shape.rest, spec.order, spec.basis,
                              spec.activation, rest_bias=spec.rest_bias, rest_out_bias=shape.rest_out_bias,
                              pieces=shape.pieces)


def masked_config(config):
    """A copy of a protected model's config as a release writes it (format 2): every activation name is LOAD_NOTICE,
    the real ones are kept in the taylormlp section's ``masked``, so that only the release classes build the model."""
    masked = {key: getattr(config, key) for key in ACTIVATION_KEYS
              if isinstance(getattr(config, key, None), str) and getattr(config, key) != LOAD_NOTICE}
    out = copy.deepcopy(config)
    for key in masked:
        setattr(out, key, LOAD_NOTICE)
    out.taylormlp = {**config.taylormlp, "format_version": FORMAT_VERSION, "masked": masked}
    out.architectures = release_architectures(config)
    return out


def release_architectures(config) -> list[str]:
    """What a release names in config.json's architectures: where taylormlp's vLLM plugin builds it natively, first
    TaylorMLP<causal LM class> (vLLM takes the first name it knows; no stock class has this one), then the stock class
    (vLLM without the plugin takes its own class, which stops on LOAD_NOTICE); elsewhere the stock class alone."""
    entry = architecture(config)
    return [architecture_name(entry)] * bool(entry["vllm"]) + [entry["model_class"]]


def architecture_name(entry: dict) -> str:
    """The class name of a release of this ARCHITECTURES row on vLLM's native path (the plugin's registry key)."""
    return "TaylorMLP" + entry["model_class"]


def unmasked_spec(config) -> ReleaseSpec:
    """The release's spec, after putting the real values of the keys config.json masks back on ``config``."""
    spec = ReleaseSpec.from_dict(getattr(config, "taylormlp", None))
    for key, value in spec.masked.items():
        setattr(config, key, value)
    return spec


def _make_release_class(base_name: str, base: bool = False):
    """TaylorMLP<base_name>: the transformers class with the release's activation restored and TaylorMLPs installed
    (``base``: a base model such as LlamaModel, what AutoModel and vLLM's Transformers backend build)."""
    parent = getattr(transformers, base_name)

    def __init__(self, config, *args, **kwargs):
        spec = unmasked_spec(config)  # before the stock layers look the activation up
        parent.__init__(self, config, *args, **kwargs)
        install_taylor_mlps(self, spec, base)

    return type("TaylorMLP" + base_name, (parent,), {"__init__": __init__})


def release_class(config, base: bool = False):
    """The class that loads a release of this architecture: its causal LM, or (base=True) its base model; ValueError
    if the installed transformers lacks it."""
    base_name = architecture(config)["base_class" if base else "model_class"]
    cls = globals().get("TaylorMLP" + base_name)
    if cls is None:  # the module-level loop below found no such class in the installed transformers
        raise ValueError(f"this release needs transformers' {base_name}, which the installed transformers "
                         f"{transformers.__version__} lacks; upgrade transformers (pip install -U transformers)")
    return cls


for _entry in ARCHITECTURES.values():
    for _base in (False, True):
        _name = _entry["base_class" if _base else "model_class"]
        try:
            globals()["TaylorMLP" + _name] = _make_release_class(_name, _base)
        except AttributeError:  # an older transformers without this architecture
            pass
