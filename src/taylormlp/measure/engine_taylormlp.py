"""Our own runtime as an engine (measure/engines.py): every model in this process, eager, on `device`.

A session is a loaded model (release.directory.load_release; the original by release.sources.load_base in the
dtype asked); timed_batch is decode.measure_decode on the batch (the prefill to the first token, then tokens − 1
cached decode steps).  bench without a workload keeps its fuller in-process report (bench.run_bench: the latency
table, the FLOPs and bytes, the time per series term, peak memory in fresh processes, and the server mode); with
one it is engine_bench's, as on every engine.  The dial installs candidates on the model it holds (in_process).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..common import __version__
from ..common.errors import TaylorMLPError
from ..release.directory import DTYPES, load_release, release_dtype
from ..release.kinds import is_release
from ..release.sources import load_base
from .bench import check_bench_memory, run_bench
from .compare import compare
from .decode import greedy, measure_decode
from .engine_bench import run_engine_bench
from .engines import BenchRequest, CompareRequest


class RuntimeSession:
    """One model loaded in this process."""

    def __init__(self, model):
        self.model = model
        self.info = {"engine": "taylormlp", "version": __version__, "dtype": str(model.dtype).removeprefix("torch."),
                     "model_class": type(model).__name__}

    def timed_batch(self, prompts: list[list[int]], tokens: int) -> dict:
        run = measure_decode(self.model, torch.tensor(prompts), tokens - 1)
        return {"prefill_s": run["prefill_s"], "decode_s": run["decode_s"], "total_s": run["prefill_s"] + run["decode_s"]}

    def generate(self, prompts: list[list[int]], tokens: int) -> list[list[int]]:
        return greedy(self.model, torch.tensor(prompts), tokens).new.tolist()

    def close(self) -> None:
        self.model = None


class RuntimeEngine:
    name = "taylormlp"
    in_process = True
    prior = None  # the eager runtime is far from the FLOPs price: the dial reads the preset probe first

    def __init__(self, device: str = "cpu"):
        self.device = device

    def require(self) -> None:
        """Nothing to install: the runtime is this package."""

    def start(self, model_dir, log_path=None, dtype: str = "auto", max_model_len: int = 0,
              impl: str = "auto") -> RuntimeSession:
        if is_release(model_dir):
            model = load_release(model_dir)
        else:
            model = load_base(model_dir, dtype=DTYPES.get(dtype, torch.float32))[0]
        return RuntimeSession(model.to(self.device))

    def rows(self, releases: dict) -> dict:
        return {name: (path, "auto") for name, path in releases.items()}

    def record(self) -> dict:
        return {}

    def bench(self, request: BenchRequest) -> dict:
        if request.dtype != "auto":
            raise TaylorMLPError(f"--dtype {request.dtype} is for --engine vllm; taylormlp's own bench times each "
                                 f"model in its release's dtype")
        serve = request.serve or {}
        for flag, key in (("--serve-requests", "requests"), ("--serve-tokens", "tokens")):
            if serve.get(key) is not None and not serve.get("concurrency"):
                raise TaylorMLPError(f"{flag} {serve[key]} needs --serve-concurrency C: it sets the requests of the "
                                     f"server mode; add --serve-concurrency (e.g. 1 8) or drop {flag}")
        serve = serve or None
        if request.workload is None:
            return run_bench(request.source, request.releases, tokens=request.tokens, repeats=request.repeats,
                             json_path=request.json_path, plot_path=request.plot_path,
                             batch_sizes=request.batch_sizes, device=request.device, serve=serve)
        if serve:
            raise TaylorMLPError("--prompt-tokens times requests in this process; drop --serve-concurrency (or run "
                                 "the server mode without --prompt-tokens)")
        check_bench_memory(list(request.releases))
        # the original in the releases' dtype: a bf16 release against a bf16 original
        dtype = str(release_dtype(request.releases[0])).removeprefix("torch.")
        return run_engine_bench(RuntimeEngine(request.device), replace(request, dtype=dtype))

    def compare(self, request: CompareRequest) -> dict:
        """compare.compare: prompt by prompt in this process, each model in its own dtype (the release's)."""
        if request.dtype != "auto":
            raise TaylorMLPError(f"--dtype {request.dtype} is for an engine that runs the models elsewhere (e.g. "
                                 f"--engine vllm); taylormlp compares each model in its own dtype")
        return compare(request.source, request.release, list(request.prompts), request.max_new_tokens)


ENGINE = RuntimeEngine()
