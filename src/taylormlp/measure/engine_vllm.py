"""The vLLM engine (measure/engines.py): vLLM at its defaults, compiled, one process per model.

Each model runs in a child process of its own (serve/vllm_engine.EngineWorker: the engine in that process), on the
path vLLM takes for it (vllm_engine.engine_kwargs: the original on vLLM's own model code, a Llama, Mistral or Qwen2
release natively through taylormlp's plugin, others on the Transformers backend with its two settings).  bench times
a native release a second time on the Transformers backend, as a row of its own (``<name> (Transformers backend)``),
so that an owner sees how much of a slowdown is the series and how much the backend.  `compare` generates on the
two models' sessions (compare.compare_on_sessions).  `serve` runs vLLM's OpenAI-compatible server.  The dial's
prior is 1: vLLM's own layers price the series at its FLOPs (measured natively on whole requests and on decode at
large batches: docs/throughput.md, "The whole request").
"""

from __future__ import annotations

from ..common.errors import TaylorMLPError
from ..release.directory import verify_release
from ..serve.vllm_engine import TRANSFORMERS_FLAGS, EngineWorker, is_native, require_vllm, run_server
from .compare import compare_on_sessions
from .engine_bench import run_engine_bench
from .engines import BenchRequest, CompareRequest, ServeRequest

BACKEND = " (Transformers backend)"  # the row of a native release run on vLLM's Transformers backend


class VllmEngine:
    name = "vllm"
    in_process = False
    prior = 1.0

    def require(self) -> None:
        require_vllm()

    def start(self, model_dir, log_path, dtype: str = "auto", max_model_len: int = 512, impl: str = "auto",
              eager: bool = False) -> EngineWorker:
        return EngineWorker(model_dir, log_path, dtype=dtype, eager=eager, max_model_len=max_model_len, impl=impl)

    def rows(self, releases: dict) -> dict:
        """Each release on its default path ("auto"), and a native one also on the Transformers backend."""
        rows = {}
        for name, path in releases.items():
            rows[name] = (path, "auto")
            if is_native(path):
                rows[name + BACKEND] = (path, "transformers")
        return rows

    def record(self) -> dict:
        return {"transformers_flags": TRANSFORMERS_FLAGS}

    def bench(self, request: BenchRequest) -> dict:
        if request.serve or request.device != "cpu":
            raise TaylorMLPError("--engine vllm times vLLM's own engine on the device vLLM was built for; drop "
                                 "--serve-concurrency and --device")
        return run_engine_bench(self, request)

    def compare(self, request: CompareRequest) -> dict:
        return compare_on_sessions(self, request)

    def serve(self, request: ServeRequest) -> int:
        require_vllm()
        verify_release(request.release)
        return run_server(request.release, request.host, request.port, request.dtype)


ENGINE = VllmEngine()
