"""TaylorMLP runtime: the module that evaluates released series coefficients, and the architecture table.

This file is self-contained (it imports only torch and transformers): `save_release` copies it verbatim into every
release as ``modeling_taylormlp.py``, so that ``from_pretrained(DIR, trust_remote_code=True)`` and vLLM's Transformers
backend run exactly this code.  There is one implementation, not two.  For a protected channel j with released gate
row ``V_j`` (times a secret-free ±1 sign), expansion point ``z0_j`` and half width ``h_j``:

    z = V_j · x,   t = (z - z0_j) / h_j
    y = Σ_n Θ_n · φ_n(t)            (plain MLP)
    y = Σ_n Θ_n · (φ_n(t) ⊙ u)      (gated MLP, u = W_up x)

with φ_n(t) = tⁿ (basis "taylor") or the Chebyshev polynomial T_n(t) (basis "chebyshev"), built term by term with
their recurrences, and all orders applied as ONE stacked matmul with Θ = [Θ_0 | … | Θ_N].  Inputs outside the
calibrated interval (|t| > 1) are evaluated at the clamped point plus the first-order continuation φ_n(t_c) +
φ_n'(t_c)(t - t_c): exact inside, linear and bounded outside (never Inf/NaN).  Unprotected channels stay an ordinary
MLP (``rest``) whose output is added.  Piecewise layers (``pieces`` Q > protected P): piece q is one more series of
channel ``owner[q]`` with its own z0, h and Θ block, live where that channel's z lies in [edge_lo[q], edge_hi[q]); a
channel's pieces partition the line (outer edges ±inf), so exactly one piece serves each input.  Cost grows with Q.
"""

from __future__ import annotations

import copy
import functools
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields

import torch
import transformers
from torch import nn

FORMAT_VERSION = 2  # 2: config.json masks the activation (LOAD_NOTICE) so that stock loaders refuse the release
READABLE_FORMATS = (1, 2)
BASES = ("taylor", "chebyshev")
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


def torch_activation(name: str):
    """The activation module transformers itself uses for this config name (bit-identical results; the rest MLP)."""
    name = "gelu_pytorch_tanh" if name == "gelu_tanh" else name
    try:
        return transformers.activations.ACT2FN[name]
    except KeyError as exc:
        raise ValueError(f"activation {name!r} is not supported") from exc


# ---------------------------------------------------------------- the basis and the module


@functools.lru_cache(maxsize=None)
def edge_slopes(basis: str, order: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(φ_n'(+1), φ_n'(−1)) for n = 0..order (exact integers, as floats): the slopes of the runtime's linear
    continuation past ±1.  Power basis: φ_n' = n tⁿ⁻¹, so ±n;  Chebyshev: T_n'(±1) = (±1)ⁿ⁺¹ n²."""
    if basis not in BASES:
        raise ValueError(f"unknown basis {basis!r}; choose one of {BASES}")
    plus = tuple(float(n if basis == "taylor" else n * n) for n in range(order + 1))
    return plus, tuple(s if n % 2 else -s for n, s in enumerate(plus))  # odd n: same slope at -1, even n: negated


BLOCK = 1 << 17  # values per [rows, P] block of series_basis on a CPU: its working set stays in the core's cache


def series_basis(tc: torch.Tensor, excess: torch.Tensor, scale: torch.Tensor, order: int, basis: str,
                 dtype: torch.dtype) -> torch.Tensor:
    """[..., N+1, P] in `dtype`: scale·φ_n(t_c) for n = 0..N plus the linear continuation scale·φ_n'(±1)·excess past
    the interval (scale = u ⊙ live mask, folded into φ_0: the recurrence is linear), each order computed in tc's dtype
    and written once into the output (TaylorMLP.features); on a CPU in blocks of BLOCK values that stay in cache."""
    # the continuation is skipped when nothing is outside, known for free on the CPU; an accelerator would stall (and
    # no CUDA graph could be captured) to say so: there it is always added (+0 inside)
    outside, P = tc.device.type != "cpu" or bool((excess != 0).any()), tc.shape[-1]
    out = torch.empty(*tc.shape[:-1], order + 1, P, dtype=dtype, device=tc.device)
    rows = [t.reshape(-1, P) for t in (tc, excess, scale)] + [out.view(-1, order + 1, P)]
    step = max(1, BLOCK // max(P, 1)) if tc.device.type == "cpu" else max(rows[0].shape[0], 1)
    for first in range(0, rows[0].shape[0], step):
        _basis_block(*(r[first:first + step] for r in rows), order, basis, outside)
    return out


def _basis_block(tc, excess, scale, out, order: int, basis: str, outside: bool) -> None:
    """series_basis on one block of rows: out [R, N+1, P] ← the features of tc, excess, scale [R, P]."""
    phi = out.unbind(-2)  # views: φ_n is written once, in place
    if outside:  # φ_n'(−1) = ±φ_n'(+1): the term is φ_n'(+1) times scale·excess (same slope) or scale·|excess|
        plus, minus = edge_slopes(basis, order)
        slope = (scale * excess, scale * excess.abs())
    two_t = 2.0 * tc
    prev, cur = scale, scale * tc
    phi[0].copy_(prev)
    for n in range(1, order + 1):
        if n >= 2:  # Taylor: φ_n = φ_(n−1)·t;  Chebyshev: T_n = 2t T_(n−1) − T_(n−2)
            prev, cur = cur, (cur * tc if basis == "taylor" else two_t * cur - prev)
        phi[n].copy_(cur + plus[n] * slope[minus[n] != plus[n]] if outside else cur)


# series_basis as one opaque op for torch.compile (inlined, the recurrence unrolls into one expression growing with N:
# minutes of compiling at order 12); once a process, though a release's copy of this file may be imported beside ours
SERIES_BASIS_OP = "series_basis_v2"  # a new name whenever series_basis changes
if not hasattr(torch.ops.taylormlp, SERIES_BASIS_OP):
    torch.library.custom_op(f"taylormlp::{SERIES_BASIS_OP}", series_basis, mutates_args=(),  # schema not inferred
                            schema="(Tensor tc, Tensor excess, Tensor scale, int order, str basis, ScalarType dtype) "
                                   "-> Tensor").register_fake(
        lambda tc, excess, scale, order, basis, dtype: tc.new_empty(*tc.shape[:-1], order + 1, tc.shape[-1],
                                                                    dtype=dtype))
SERIES_BASIS = getattr(torch.ops.taylormlp, SERIES_BASIS_OP)


def piece_inputs(module, x: torch.Tensor):
    """Per series piece of `module` (a TaylorMLP, or anything with its gate/up/pieces/owner/edges): the channel's
    z = gate·x and u = up·x in float32 or wider, and which pieces are live (None: one piece per channel)."""
    index = (module.owner, module.edge_lo, module.edge_hi) if module.pieces > module.protected else None
    return select_pieces(module.gate(x), module.up(x) if module.up is not None else None, index)


def select_pieces(z: torch.Tensor, u, index=None):
    """z and u per channel -> per series piece, in float32 or wider, and which pieces are live: ``index`` is
    (owner, edge_lo, edge_hi), piece q reading channel owner[q] and live for z in [edge_lo[q], edge_hi[q]); None:
    one piece per channel (returned as they are, live everywhere: None)."""
    work = torch.promote_types(z.dtype, torch.float32)
    z = z.to(work)
    u = u.to(work) if u is not None else None
    if index is None:
        return z, u, None
    owner, edge_lo, edge_hi = index
    z = z[..., owner]  # piecewise: each piece reads its channel's z and is live on its own part
    u = u[..., owner] if u is not None else None
    return z, u, (z >= edge_lo.to(work)) & (z < edge_hi.to(work))


def piece_coordinates(z: torch.Tensor, z0: torch.Tensor, h: torch.Tensor):
    """t_c = t clamped to [-1, 1] with t = (z − z0)/h per piece, and the excess t − t_c (zero inside the calibrated
    interval); a NaN input counts as t = 0, so it cannot poison the series."""
    t = torch.nan_to_num((z - z0.to(z.dtype)) / h.to(z.dtype), nan=0.0)
    tc = t.clamp(-1.0, 1.0)
    return tc, t - tc


def stacked_features(tc: torch.Tensor, excess: torch.Tensor, u, active, order: int, basis: str,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """[..., (N+1)·Q] in `dtype` (default tc's): the basis φ_n(t) of every piece times the live mask and u (gated),
    series_basis (under torch.compile the custom op SERIES_BASIS): what the one stacked matmul with Θ reads."""
    build = SERIES_BASIS if torch.compiler.is_compiling() else series_basis
    return build(tc, excess, feature_scale(tc, u, active), order, basis, dtype or tc.dtype).flatten(-2)


def feature_scale(tc: torch.Tensor, u, active) -> torch.Tensor:
    """u ⊙ the live mask (each where there is one, else ones): what every order of a piece's features is scaled by."""
    scale = u if u is not None else torch.ones_like(tc)
    return scale * active.to(tc.dtype) if active is not None else scale


class RestMLP(nn.Module):
    """The unprotected channels, kept as an ordinary MLP (as in the authors' code)."""

    def __init__(self, family: str, hidden: int, channels: int, act: str, bias: bool, out_bias: bool):
        super().__init__()
        self.family = family
        self.act_name = act
        self.act = torch_activation(act)
        self.gate = nn.Linear(hidden, channels, bias=bias)
        self.up = nn.Linear(hidden, channels, bias=False) if family == "gated" else None
        self.down = nn.Linear(channels, hidden, bias=out_bias)

    def forward(self, x):
        a = self.act(self.gate(x))
        if self.up is not None:
            a = a * self.up(x)
        return self.down(a)


class TaylorMLP(nn.Module):
    """An MLP block whose protected channels are evaluated from series coefficients Θ_0..Θ_N."""

    def __init__(self, family: str, hidden: int, protected: int, rest: int, order: int, basis: str, act: str,
                 rest_bias: bool = False, rest_out_bias: bool = False, pieces: int | None = None):
        super().__init__()
        if basis not in BASES:
            raise ValueError(f"unknown basis {basis!r}; choose one of {BASES}")
        if family not in ("gated", "plain"):
            raise ValueError(f"unknown MLP family {family!r}")
        pieces = protected if pieces is None else pieces
        if pieces < protected:
            raise ValueError(f"a layer needs at least one series piece per protected channel ({pieces} < {protected})")
        self.family, self.hidden, self.protected, self.order, self.basis = family, hidden, protected, order, basis
        self.pieces = pieces
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        self.gate = nn.Linear(hidden, protected, bias=False)  # V (plain) or W_gate (gated), rows times ±1
        self.up = nn.Linear(hidden, protected, bias=False) if family == "gated" else None  # W_up
        # one series per piece; a channel's pieces partition the real line [edge_lo, edge_hi) (outer edges ±inf)
        self.z0 = nn.Parameter(torch.zeros(pieces), requires_grad=False)  # expansion points (times ±1)
        self.h = nn.Parameter(torch.ones(pieces), requires_grad=False)  # half widths of the intervals
        if pieces > protected:  # buffers, not parameters: an engine that re-creates parameters in its dtype (vLLM)
            # loads buffers as they are, so the piece -> channel index stays an integer tensor
            self.register_buffer("owner", torch.zeros(pieces, dtype=torch.long))
            self.register_buffer("edge_lo", torch.full((pieces,), -float("inf")))
            self.register_buffer("edge_hi", torch.full((pieces,), float("inf")))
        self.theta = nn.Parameter(torch.zeros(hidden, (order + 1) * pieces))  # [Θ_0 | Θ_1 | … | Θ_N]
        self.rest = RestMLP(family, hidden, rest, act, rest_bias, rest_out_bias) if rest > 0 else None

    def extra_repr(self) -> str:
        return (f"family={self.family}, protected={self.protected}, pieces={self.pieces}, order={self.order}, "
                f"basis={self.basis}")

    def coordinates(self, x: torch.Tensor):
        """Per piece: t_c = t clamped to [-1, 1] with t = (z − z0)/h, the excess t − t_c (zero inside the calibrated
        interval), u (gated) and which pieces are live (None: one piece per channel); float32 or wider."""
        z, u, active = piece_inputs(self, x)
        return (*piece_coordinates(z, self.z0, self.h), u, active)

    def features(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[..., (N+1)·P] stacked basis features φ_n(t) (⊙ u for gated MLPs), computed in float32 or wider and written
        in `dtype` (default: that): series_basis, in place and bit-identical to the formulas; under torch.compile
        (vLLM, CUDA graphs) the custom op SERIES_BASIS; with autograd recording, the out-of-place form."""
        inputs = [x, self.gate.weight, self.z0, self.h] + ([self.up.weight] if self.up is not None else [])
        if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
            return self.features_differentiable(x, dtype)
        return stacked_features(*self.coordinates(x), self.order, self.basis, dtype)

    def features_differentiable(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """features() out of place, as the formulas read (autograd runs through it; the in-place form is tested against
        it bit for bit): no branch on a tensor's value, no write into a view; the continuation is always added."""
        tc, excess, u, active = self.coordinates(x)
        scale = feature_scale(tc, u, active)
        phi = [scale, scale * tc]  # scale·φ_0, scale·φ_1
        for _ in range(2, self.order + 1):  # Taylor: φ_n = φ_(n−1)·t;  Chebyshev: T_n = 2t T_(n−1) − T_(n−2)
            phi.append(phi[-1] * tc if self.basis == "taylor" else 2.0 * tc * phi[-1] - phi[-2])
        plus, minus = edge_slopes(self.basis, self.order)  # φ_n'(±1)·excess past the interval (0 inside)
        slope = (scale * excess, scale * excess.abs())  # on the left, φ_n'(−1)·excess = φ_n'(+1)·(±excess)
        terms = [phi[0]] + [phi[n] + plus[n] * slope[minus[n] != plus[n]] for n in range(1, self.order + 1)]
        return torch.stack(terms, dim=-2).flatten(-2).to(dtype or tc.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.protected == 0:  # a layer with no protected channel is its rest MLP alone (no zero-width matmul)
            return self.rest(x)
        y = nn.functional.linear(self.features(x, self.theta.dtype), self.theta).to(x.dtype)  # one stacked matmul
        if self.rest is not None:
            y = y + self.rest(x)
        return y


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
