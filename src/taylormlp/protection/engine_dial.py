"""`taylormlp protect --slowdown X --engine NAME`: the dial's measurements taken on an engine that runs releases from
their directories (measure/engines.py; vLLM, the engine large-scale users serve with), instead of our own runtime.

EngineDial is the `measure(protector, coverage, batches) -> {batch: ratio}` that throttle.choose_slowdown calls.
The original runs in one session, started at the first measurement and kept to the end.  A candidate (a
Protector's setting at a coverage, the model itself still the original) is written as a temporary release
(Protector.write_release, float32) and started in a session of its own (on vLLM: natively through taylormlp's plugin
where it covers the architecture, else the Transformers backend); the two are timed in interleaved rounds
(decode.interleaved) at the asked batch sizes, B copies of protect's timing prompt decoded together (with a
workload: its first B distinct prompts of P tokens, G tokens each), and each batch's value is, per phase (prefill,
decode, request), the median of the paired (same-round) ratios, as `taylormlp bench --engine NAME` reports them.
A read of the setting read last (the dial's confirming read, which is also its curve, or a re-read) keeps the
candidate's files but starts both sessions afresh, side by side: reads taken on one pair of engine processes are
not independent (one pair's reads agree with each other more than with fresh pairs' reads of the same setting;
docs/throughput.md, "The dial on vLLM").  A different setting stops the candidate's session and deletes its directory first, so at most two
run at once.

What makes the dial fast on an engine is reading few settings, since each read costs an engine start (a compile
for a new setting) and REPEATS interleaved rounds: the engine's `prior` (vLLM: 1, its layers price the series at
its FLOPs) lets throttle.choose_slowdown read first the setting the FLOPs ratio picks, not the preset probe; each
read after it refits the line.
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


class EngineDial:
    """measure(protector, coverage, batches) on `engine` (measure/engines.Engine) for the original at SOURCE_DIR (see
    the module's docstring); `engine_record` describes it for the release's slowdown record.  close() stops every
    session and deletes the candidates.  `eager`: the engine's uncompiled mode where it has one (tests)."""

    def __init__(self, engine, source_dir, tokenizer, prompt: list[int], dtype: str = "auto", eager: bool = False,
                 tokens: int = 32, repeats: int = REPEATS, workdir=None, workload: Workload | None = None):
        engine.require()
        self.runner, self.prior = engine, engine.prior
        self.source_dir, self.tokenizer, self.prompt = Path(source_dir), tokenizer, list(prompt)
        self.dtype, self.eager, self.tokens, self.repeats = dtype, eager, tokens, repeats
        self.workload = workload  # B distinct prompts of P tokens and G tokens each, instead of B copies of `prompt`
        self.prompts: list[list[int]] = []
        if workload is not None:
            self.tokens = workload.new_tokens
        self.own_workdir = workdir is None  # a temporary one is deleted by close(), engine logs included
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"taylormlp-{engine.name}-dial-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.original = None  # its session
        self.candidate: tuple | None = None  # (key, worker, directory)
        self.count = 0
        self.release_class: str | None = None  # the class the engine built for the last candidate

    @property
    def mode(self) -> str:
        return "eager" if self.eager else "compiled"

    @property
    def engine(self) -> dict:
        info = self.original.info if self.original is not None else {}
        return {"name": self.runner.name, "version": info.get("version"), "mode": self.mode,
                "dtype": info.get("dtype", self.dtype), "tokens": self.tokens, "repeats": self.repeats,
                "release_class": self.release_class}

    def _worker(self, model_dir, name: str):
        log(f"starting {self.runner.name} for {name} ({self.dtype}; {self.mode}) ...")
        length = max(512, (self.workload.prompt_tokens if self.workload else len(self.prompt)) + self.tokens + 16)
        return self.runner.start(model_dir, self.workdir / f"{name}.log", dtype=self.dtype, max_model_len=length,
                                 **({"eager": True} if self.eager else {}))

    def _candidate_worker(self, protector, coverage: float):
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
        self.release_class = worker.info.get("model_class")
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
        runs = interleaved({(b, name): (lambda w=w, b=b: w.timed_batch(self.batch(b), self.tokens)) for b in sizes
                            for name, w in workers.items()}, self.repeats, f"timing on {self.runner.name} (interleaved)")
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
