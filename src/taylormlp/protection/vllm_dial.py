"""`taylormlp protect --slowdown X --engine vllm`: the dial's measurements taken on vLLM, the engine large-scale users
serve with, instead of our own eager runtime.

EngineDial is the `measure(protector, coverage, batches) -> {batch: ratio}` that throttle.choose_slowdown calls.
The original runs in one vllm_engine.EngineWorker, started at the first measurement and kept to the end.  A candidate
(a Protector's setting at a coverage, the model itself still the original) is written as a temporary release
(Protector.write_release, float32) and started in a worker of its own, on the path vLLM takes for it (natively through
taylormlp's plugin where it covers the architecture, else the Transformers backend: vllm_engine.engine_kwargs); the
two are timed in interleaved rounds (decode.interleaved) at the asked batch sizes, B copies of protect's timing
prompt decoded together (with a workload: its first B distinct prompts of P tokens, G tokens each), and each batch's
value is, per phase (prefill, decode, request), the median of the paired (same-round) ratios, as `taylormlp bench
--engine vllm` reports them.  A read of the setting read last (the dial's confirming read, which is also its curve,
or a re-read) keeps the candidate's files but starts both engines afresh, side by side: reads taken on one pair of
engine processes are not independent (on a 2-core CPU one pair read 3.9x, 4.0x and 3.9x for a setting that fresh
pairs read 3.1x-3.6x).  A different setting stops the candidate's engine and deletes its directory first, so at most
two engines run at once.

What makes the dial fast on an engine is reading few settings, since each read costs an engine start (a compile
for a new setting) and REPEATS interleaved rounds: `prior` = 1 tells throttle.choose_slowdown that vLLM's own
layers price the series at its FLOPs (measured natively: the whole request at batch 8 and the decode at batch 32
within 0.9x-1.1x of the FLOPs ratio, docs/throughput.md), so the first setting read is the one the FLOPs ratio
picks, not the preset probe, and each read after it refits the line.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path

import torch

from ..common.choices import REPEATS
from ..common.progress import log
from ..measure.decode import interleaved, phase_ratios
from ..measure.workload import Workload, workload_prompts
from ..release.directory import ModelTensors
from ..serve.vllm_engine import EngineWorker, require_vllm


class EngineDial:
    """measure(protector, coverage, batches) on vLLM for the original at SOURCE_DIR (see the module's docstring);
    `engine` describes it for the release's slowdown record.  close() stops every engine and deletes the candidates."""

    prior = 1.0  # the line's slope before any read: vLLM's layers price the series at its FLOPs

    def __init__(self, source_dir, tokenizer, prompt: list[int], dtype: str = "auto", eager: bool = False,
                 tokens: int = 32, repeats: int = REPEATS, workdir=None, workload: Workload | None = None):
        require_vllm()
        self.source_dir, self.tokenizer, self.prompt = Path(source_dir), tokenizer, list(prompt)
        self.dtype, self.eager, self.tokens, self.repeats = dtype, eager, tokens, repeats
        self.workload = workload  # B distinct prompts of P tokens and G tokens each, instead of B copies of `prompt`
        self.prompts: list[list[int]] = []
        if workload is not None:
            self.tokens = workload.new_tokens
        self.own_workdir = workdir is None  # a temporary one is deleted by close(), engine logs included
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="taylormlp-vllm-dial-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.original: EngineWorker | None = None
        self.candidate: tuple | None = None  # (key, worker, directory)
        self.count = 0
        self.release_class: str | None = None  # the class vLLM built for the last candidate

    @property
    def mode(self) -> str:
        return "eager" if self.eager else "compiled"

    @property
    def engine(self) -> dict:
        ready = self.original.ready if self.original is not None else {}
        return {"name": "vllm", "version": ready.get("vllm"), "mode": self.mode,
                "dtype": ready.get("dtype", self.dtype), "tokens": self.tokens, "repeats": self.repeats,
                "release_class": self.release_class}

    def _worker(self, model_dir, name: str) -> EngineWorker:
        log(f"starting vLLM for {name} ({self.dtype}; {self.mode}) ...")
        length = max(512, (self.workload.prompt_tokens if self.workload else len(self.prompt)) + self.tokens + 16)
        return EngineWorker(model_dir, self.workdir / f"{name}.log", dtype=self.dtype, eager=self.eager,
                            max_model_len=length)

    def _candidate_worker(self, protector, coverage: float) -> EngineWorker:
        key = (id(protector), round(float(coverage), 6))
        if self.candidate is not None and self.candidate[0] == key:  # read again: fresh engines, the same files
            _, worker, directory = self.candidate
            self.candidate, original, self.original = None, self.original, None
            worker.close()
            original.close()
            self.original = self._worker(self.source_dir, "original")
        else:
            self._drop_candidate()
            self.count += 1
            directory = self.workdir / f"candidate-{self.count}"
            spec = protector.release_spec(coverage, {"candidate": True})
            protector.write_release(directory / "release", spec, ModelTensors(protector.model), torch.float32,
                                    self.tokenizer)
        try:
            worker = self._worker(directory / "release", directory.name)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        self.candidate = (key, worker, directory)
        self.release_class = worker.ready.get("model_class")
        return worker

    def _drop_candidate(self) -> None:
        if self.candidate is not None:
            _, worker, directory = self.candidate
            self.candidate = None
            worker.close()
            shutil.rmtree(directory, ignore_errors=True)

    def __call__(self, protector, coverage: float, batches) -> dict[int, float]:
        if self.original is None:
            self.original = self._worker(self.source_dir, "original")
        release = self._candidate_worker(protector, coverage)
        sizes = list(dict.fromkeys(int(b) for b in batches))
        workers = {"original": self.original, "release": release}
        runs = interleaved({(b, name): (lambda w=w, b=b: w.run(self.batch(b), self.tokens)) for b in sizes
                            for name, w in workers.items()}, self.repeats, "timing on vLLM (interleaved)")
        return {b: {phase: statistics.median(r) for phase, r in
                    phase_ratios(runs[(b, "release")], runs[(b, "original")]).items()} for b in sizes}

    def batch(self, size: int) -> list[list[int]]:
        """The prompts of one run at batch `size`: `size` copies of the prompt, or the workload's first `size`."""
        if self.workload is None:
            return [self.prompt] * size
        if len(self.prompts) < size:
            self.prompts = workload_prompts(self.tokenizer, self.workload.prompt_tokens, size)
        return self.prompts[:size]

    def close(self) -> None:
        self._drop_candidate()
        if self.original is not None:
            self.original.close()
            self.original = None
        if self.own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
