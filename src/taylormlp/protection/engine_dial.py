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
A candidate is written at a path that names its setting (engine_dial.candidate_path: a hash of the original's path and
the candidate's spec, under taylormlp's cache), and deleted when the dial is done with it: an engine that caches its
compiled model by path and configuration (vLLM does) then compiles a setting once, not once a protect run, and a
later dial of the same model reads it after a cached start.  Another process using that path at the same time
(its lock held) sends the candidate to a private directory instead.
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

import fcntl
import hashlib
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import torch

from ..common.choices import REPEATS
from ..common.progress import log
from ..measure.decode import phase_ratios
from ..measure.engines import timed_sessions
from ..measure.workload import Workload, workload_prompts
from ..release.directory import ModelTensors
from ..release.sources import taylormlp_cache


def candidate_path(source_dir, spec: dict) -> Path:
    """Where the dial writes the candidate of release spec `spec` (ReleaseSpec.to_dict) of the original at SOURCE_DIR:
    the same path for the same setting, run after run."""
    key = json.dumps({"source": str(Path(source_dir).resolve()), "spec": spec}, sort_keys=True, default=str)
    return taylormlp_cache() / "dial-candidates" / hashlib.sha256(key.encode()).hexdigest()[:20]


def claim(directory: Path):
    """The lock of `directory` (an open file holding an exclusive flock), or None where another process holds it."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    lock = open(directory.with_suffix(".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


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
        self.candidate: tuple | None = None  # (key, worker, directory, lock)
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
            _, worker, directory, lock = self.candidate
            self.candidate, original, self.original = None, self.original, None
            worker.close()
            original.close()
            self.original = self._worker(self.source_dir, "original")
        else:
            self._drop_candidate()
            self.count += 1
            spec = protector.release_spec(coverage, {"candidate": True})
            directory = candidate_path(self.source_dir, spec.to_dict())
            lock = claim(directory)
            if lock is None:  # another dial of this very setting is running: a private path (an uncached compile)
                directory = self.workdir / f"candidate-{self.count}"
            try:
                protector.write_release(directory / "release", spec, ModelTensors(protector.model), torch.float32,
                                        self.tokenizer, force=True)
            except BaseException:
                self._remove(directory, lock)
                raise
        try:
            worker = self._worker(directory / "release", f"candidate-{self.count}")
        except BaseException:
            self._remove(directory, lock)
            raise
        self.candidate = (key, worker, directory, lock)
        self.release_class = worker.info.get("model_class")
        return worker

    @staticmethod
    def _remove(directory: Path, lock) -> None:
        shutil.rmtree(directory, ignore_errors=True)
        if lock is not None:
            lock.close()  # releases the flock; the lock file stays (removing it would race a waiting claim)

    def _drop_candidate(self) -> None:
        if self.candidate is not None:
            _, worker, directory, lock = self.candidate
            self.candidate = None
            worker.close()
            self._remove(directory, lock)

    def __call__(self, protector, coverage: float, batches) -> dict[int, float]:
        if self.original is None:
            self.original = self._worker(self.source_dir, "original")
        release = self._candidate_worker(protector, coverage)
        sizes = list(dict.fromkeys(int(b) for b in batches))
        workers = {"original": self.original, "release": release}
        runs = timed_sessions(workers, {b: self.batch(b) for b in sizes}, self.tokens, self.repeats,
                              f"timing on {self.runner.name} (interleaved)")
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
