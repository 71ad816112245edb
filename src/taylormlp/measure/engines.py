"""The seam for engines: what `taylormlp bench`, `compare`, `protect --slowdown --engine`, and `serve` ask of an
engine, and the one registry they take it from.

An engine is one module with an ``ENGINE`` object and one row in common/choices.ENGINES (module, commands offering
it, a line for --help).  ``get(name, command)`` resolves the row once; nothing else in the package names an engine.
What the module implements depends on the commands its row lists:

    every engine       name, require()                     (require: a TaylorMLPError naming the install, if absent)
    bench, protect     start(model_dir, log_path, dtype=, max_model_len=, impl=) -> Session
                       rows(releases) -> {row name: (path, path option)}   the rows bench times for the releases
                       in_process, prior                    (below)
                       record() -> dict                     what the engine adds to bench's JSON and the card
    bench              bench(BenchRequest) -> dict          (engine_bench.run_engine_bench does the usual one)
    compare            compare(CompareRequest) -> dict      (compare.compare_on_sessions does the usual one)
    serve              serve(ServeRequest) -> int           the server's exit status

A Session is one model running on the engine: ``info`` (what runs: version, dtype, the class built),
``timed_batch(prompts, tokens)`` (the prompts decoded together, greedy, EOS ignored, `tokens` tokens each: the
seconds of the prefill to the first token, the decode after it, and both), ``generate(prompts, tokens)`` (the greedy
tokens) and ``close()``.  Sessions are timed by ``timed_sessions`` (decode.interleaved, each session warmed by one
short request) and every slowdown read off them is decode.phase_ratios' median of paired ratios.

``in_process``: the models run in this process, so protect's dial installs each candidate on the model it holds
(throughput.measure_ratios) instead of writing it and starting a session (protection/engine_dial.EngineDial).
``prior``: the dial's slope from FLOPs ratio to slowdown before any read (None: read the preset probe first).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..common.choices import ENGINES, engine_names
from ..common.errors import TaylorMLPError
from .decode import interleaved


class Session(Protocol):
    info: dict

    def timed_batch(self, prompts: list[list[int]], tokens: int) -> dict: ...

    def generate(self, prompts: list[list[int]], tokens: int) -> list[list[int]]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class BenchRequest:
    """What `taylormlp bench` asks: the original SOURCE and the releases, B copies of bench's prompt at each batch
    size (`tokens` tokens each) or a `workload`, `repeats` interleaved rounds, and where the results go."""

    source: object
    releases: tuple
    batch_sizes: tuple | None = None
    tokens: int = 32
    repeats: int = 3
    dtype: str = "auto"
    device: str = "cpu"
    workload: object = None  # workload.Workload
    serve: dict | None = None  # --serve-concurrency and friends (serve_bench.ServeOptions' fields)
    json_path: Path | None = None
    plot_path: Path | None = None


@dataclass(frozen=True)
class CompareRequest:
    """What `taylormlp compare` asks: the original SOURCE, the release, the prompt file's prompts ({"kind", "text"}),
    the tokens generated for each, and the dtype the engine runs both in."""

    source: object
    release: Path
    prompts: tuple
    max_new_tokens: int = 64
    dtype: str = "auto"


@dataclass(frozen=True)
class ServeRequest:
    """What `taylormlp serve` asks: the release, the address, the dtype and transformers' batching settings."""

    release: Path
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "auto"
    batching: str = "continuous"
    kv_cache_tokens: int = 8192
    max_batch_tokens: int = 256


WARM_TOKENS = 2  # a session's warm-up: one prompt, a prefill and a decode step (an engine compiles when it starts)


def timed_sessions(sessions: dict, batches: dict, tokens: int, repeats: int, desc: str) -> dict:
    """Every session (name: Session) at every batch (size: prompts), `tokens` tokens each, in `repeats` interleaved
    rounds after a warm-up of one short request per session: {(size, name): [timed_batch result per round]}."""
    warm_prompt = next(iter(batches.values()))[:1]
    return interleaved({(b, name): (lambda s=s, b=b: s.timed_batch(batches[b], tokens)) for b in batches
                        for name, s in sessions.items()}, repeats, desc,
                       warm=[lambda s=s: s.timed_batch(warm_prompt, WARM_TOKENS) for s in sessions.values()])


class Engine(Protocol):
    name: str
    in_process: bool
    prior: float | None

    def require(self) -> None: ...

    def start(self, model_dir, log_path, dtype: str = "auto", max_model_len: int = 512,
              impl: str = "auto") -> Session: ...

    def rows(self, releases: dict) -> dict: ...

    def record(self) -> dict: ...

    def bench(self, request: BenchRequest) -> dict: ...

    def compare(self, request: CompareRequest) -> dict: ...

    def serve(self, request: ServeRequest) -> int: ...


def get(name: str, command: str) -> Engine:
    """The engine NAME as `command` offers it (its module's ENGINE), or a TaylorMLPError naming those it offers."""
    offered = engine_names(command)
    if name not in offered:
        raise TaylorMLPError(f"unknown engine {name!r} for {command}; choose one of {', '.join(offered)}")
    return importlib.import_module(ENGINES[name].module).ENGINE
