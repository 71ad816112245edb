"""The seam for engines: what `taylormlp bench`, `protect --slowdown --engine`, and `serve` ask of an engine, and the
one registry they take it from.

An engine is one module with an ``ENGINE`` object and one row in common/choices.ENGINES (module, commands offering
it, a line for --help).  ``get(name, command)`` resolves the row once; nothing else in the package names an engine.
What the module implements depends on the commands its row lists:

    every engine       name, require()                     (require: a TaylorMLPError naming the install, if absent)
    bench, protect     start(model_dir, log_path, dtype=, max_model_len=, impl=) -> Session
                       rows(releases) -> {row name: (path, path option)}   the rows bench times for the releases
                       in_process, prior                    (below)
                       record() -> dict                     what the engine adds to bench's JSON and the card
    bench              bench(BenchRequest) -> dict          (engine_bench.run_engine_bench does the usual one)
    serve              serve(ServeRequest) -> int           the server's exit status

A Session is one model running on the engine: ``info`` (what runs: version, dtype, the class built),
``timed_batch(prompts, tokens)`` (the prompts decoded together, greedy, EOS ignored, `tokens` tokens each: the
seconds of the prefill to the first token, the decode after it, and both), ``generate(prompts, tokens)`` (the greedy
tokens) and ``close()``.  Every slowdown read off sessions is decode.phase_ratios' median of paired ratios.

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
class ServeRequest:
    """What `taylormlp serve` asks: the release, the address, the dtype and transformers' batching settings."""

    release: Path
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "auto"
    batching: str = "continuous"
    kv_cache_tokens: int = 8192
    max_batch_tokens: int = 256


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

    def serve(self, request: ServeRequest) -> int: ...


def get(name: str, command: str) -> Engine:
    """The engine NAME as `command` offers it (its module's ENGINE), or a TaylorMLPError naming those it offers."""
    offered = engine_names(command)
    if name not in offered:
        raise TaylorMLPError(f"unknown engine {name!r} for {command}; choose one of {', '.join(offered)}")
    return importlib.import_module(ENGINES[name].module).ENGINE
