"""`taylormlp bench --serve-concurrency C...`: throughput through the server, as a large-scale user pays it.

Every model (the original and each release) is served the way `taylormlp serve` serves a release (serve.ReleaseServer:
transformers' serve app and continuous batching; the original through sources.load_base), each in its own process,
all started once and kept up.  The benchmark process is the load generator: C client threads, each with its own
`openai` client, each sending `requests` streamed greedy chat requests (completions for a model without a chat
template) back to back, all clients released together.  One run = one model at one concurrency; the runs are timed
interleaved (decode.interleaved: a warm-up run each, then round robin, the first model rotated every round), one
server busy at a time, so that noise from other work on the machine falls on every model alike.

Every request is the same prompt with `max_tokens` = `tokens` and EOS ignored (transformers' `generation_config`
request field with eos_token_id -1: continuous batching stops a request at EOS only for ids >= 0), so every request
decodes exactly `tokens` tokens and every model does the same work; the tokens each request actually produced (the
usage of its last streamed chunk) are counted and reported.

Per run: requests/s and output tokens/s (over all clients: tokens produced / the wall time from the clients' release
to the last answer), TTFT (request sent to its first streamed text) and inter-token latency ((last text − first
text) / (tokens − 1)), medians over the run's requests; and the peak number of requests in flight at once.  Per
concurrency and model the medians over the rounds, and the slowdown = the original's output tokens/s / this
model's (median over the rounds of the same-round ratio, range over the rounds), comparable to `--batch-sizes`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..common.errors import TaylorMLPError
from ..common.progress import log, status
from ..serve.transformers_server import PAGE_TOKENS, ReleaseServer, require_serve_extra
from .decode import interleaved, paired_ratios

# the `generation_config` request field (transformers' serve extension of OpenAI's API): no EOS stops a request
IGNORE_EOS = json.dumps({"eos_token_id": -1})
KV_CACHE_FLOOR = 8192  # tokens: `taylormlp serve`'s default --kv-cache-tokens
STARTUP_TIMEOUT_S = 3600.0  # a server loads its model before it answers /health (minutes for a large release)
REQUEST_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class ServeOptions:
    """--serve-concurrency, --serve-requests, --serve-tokens."""

    concurrency: tuple[int, ...]
    requests: int = 1  # per client per run, back to back
    tokens: int = 16  # max_tokens of every request (EOS ignored: every request decodes this many)


def check_serve_options(options: ServeOptions, device: str) -> None:
    """Before anything is loaded: the serve extra is installed and the numbers make sense."""
    require_serve_extra("--serve-concurrency")
    if not options.concurrency or min(options.concurrency) < 1 or options.requests < 1 or options.tokens < 1:
        raise TaylorMLPError(f"--serve-concurrency, --serve-requests and --serve-tokens must be whole numbers of at "
                             f"least 1, got {list(options.concurrency)}, {options.requests}, {options.tokens}")
    if device != "cpu":
        raise TaylorMLPError("--serve-concurrency serves on the CPU (`taylormlp serve` has no device choice): drop "
                             "--device or give --device cpu")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def kv_cache_tokens(concurrency: int, prompt_tokens: int, tokens: int) -> int:
    """A paged KV cache that holds `concurrency` requests at once (pages of PAGE_TOKENS per request), twice over,
    and at least `taylormlp serve`'s default: requests never wait for cache pages."""
    per_request = math.ceil((prompt_tokens + tokens + 1) / PAGE_TOKENS) * PAGE_TOKENS
    return max(KV_CACHE_FLOOR, 2 * concurrency * per_request)


# ---------------------------------------------------------------- the clients


def stream_request(client, model: str, prompt: str, chat: bool, tokens: int, clock=time.perf_counter) -> dict:
    """One streamed greedy request of `tokens` tokens (EOS ignored): its send, first-text and end times (`clock`),
    the time of its last text, and the tokens produced (usage of the last chunk: OpenAI's `include_usage`, which
    transformers needs from 5.25 and sends regardless before)."""
    common = dict(model=model, max_tokens=tokens, temperature=0, stream=True, stream_options={"include_usage": True},
                  extra_body={"generation_config": IGNORE_EOS})
    start = clock()
    if chat:
        stream = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **common)
    else:
        stream = client.completions.create(prompt=prompt, **common)
    first = last = None
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        if not chunk.choices:
            continue
        text = chunk.choices[0].delta.content if chat else chunk.choices[0].text
        if text:
            last = clock()
            first = last if first is None else first
    end = clock()
    if usage is None:
        raise TaylorMLPError(f"the server of {model!r} streamed no usage: it is not transformers' serve app")
    return {"start_s": start, "first_s": first, "last_s": last, "end_s": end,
            "tokens": int(usage.completion_tokens), "prompt_tokens": int(usage.prompt_tokens)}


def peak_in_flight(records: list[dict]) -> int:
    """The most requests between their send and their end at one moment (an end at the same time as a send first)."""
    events = sorted([(r["start_s"], 1) for r in records] + [(r["end_s"], -1) for r in records],
                    key=lambda e: (e[0], e[1]))
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def run_summary(records: list[dict], wall_s: float, tokens: int) -> dict:
    """One run's figures from its requests' records (times relative to the clients' release)."""
    produced = sum(r["tokens"] for r in records)
    ttft = [r["first_s"] - r["start_s"] for r in records if r["first_s"] is not None]
    itl = [(r["last_s"] - r["first_s"]) / (r["tokens"] - 1) for r in records
           if r["first_s"] is not None and r["tokens"] > 1]
    return {
        "requests": len(records),
        "wall_s": wall_s,
        "requests_per_s": len(records) / wall_s,
        "output_tokens": produced,
        "tokens_requested": len(records) * tokens,
        "output_tokens_per_s": produced / wall_s,
        "ttft_s": statistics.median(ttft) if ttft else math.nan,
        "inter_token_s": statistics.median(itl) if itl else math.nan,
        "peak_in_flight": peak_in_flight(records),
        "records": records,
    }


def drive(url: str, model: str, prompt: str, chat: bool, concurrency: int, requests: int, tokens: int,
          clock=time.perf_counter) -> dict:
    """One run: `concurrency` clients, released together, each sending `requests` streamed requests back to back
    to the server at `url` (its /v1 API); run_summary of them."""
    from openai import OpenAI  # the serve extra: optional, checked by check_serve_options

    clients = [OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)
               for _ in range(concurrency)]
    gate = threading.Barrier(concurrency + 1)

    def client_loop(client) -> list[dict]:
        gate.wait()
        return [stream_request(client, model, prompt, chat, tokens, clock) for _ in range(requests)]

    try:
        with ThreadPoolExecutor(concurrency, thread_name_prefix="serve-bench-client") as pool:
            futures = [pool.submit(client_loop, client) for client in clients]
            gate.wait()
            t0 = clock()
            records = [record for future in futures for record in future.result()]
            wall_s = clock() - t0
    except TaylorMLPError:
        raise
    except Exception as exc:  # noqa: BLE001 - openai's and httpx's errors: the server failed a request
        raise TaylorMLPError(f"serving {model!r} at concurrency {concurrency} failed: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    finally:
        for client in clients:
            client.close()
    for record in records:
        for key in ("start_s", "first_s", "last_s", "end_s"):
            record[key] = None if record[key] is None else record[key] - t0
    return run_summary(records, wall_s, tokens)


# ---------------------------------------------------------------- the servers


def server_main(argv: list[str]) -> None:
    """Child process: serve one model (kind "original" or "release") until SIGINT / SIGTERM."""
    kind, path, name, port, kv_tokens, threads = argv
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(int(threads))  # and the model's own process (transformers >= 5.25): ReleaseServer's threads
    hf_logging.set_verbosity_error()  # transformers logs a warning per request
    ReleaseServer(path, port=int(port), kv_cache_tokens=int(kv_tokens), name=name, original=kind == "original",
                  threads=int(threads)).run()


def is_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _tail(log_path: Path) -> str:
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


@contextlib.contextmanager
def served_models(targets: dict[str, tuple[str, str]], kv_tokens: int, threads: int,
                  startup_timeout_s: float = STARTUP_TIMEOUT_S):
    """Start one server process per target (name -> (kind, path)), all at once; yields {name: url} when every one
    answers /health; stops them all (SIGINT, then kill) on the way out."""
    code = "import sys; from taylormlp.measure.serve_bench import server_main; server_main(sys.argv[1:])"
    env = {**os.environ, "TAYLORMLP_QUIET": "1"}
    with tempfile.TemporaryDirectory(prefix="taylormlp-serve-bench-") as logs:
        procs, urls, log_paths = {}, {}, {}
        try:
            for i, (name, (kind, path)) in enumerate(targets.items()):
                port = free_port()
                urls[name] = f"http://127.0.0.1:{port}"
                log_paths[name] = Path(logs) / f"server-{i}.log"
                with log_paths[name].open("w") as out:
                    procs[name] = subprocess.Popen([sys.executable, "-c", code, kind, str(path), name, str(port),
                                                    str(kv_tokens), str(threads)], stdout=out, stderr=out, env=env)
            deadline = time.monotonic() + startup_timeout_s
            with status(f"starting {len(procs)} servers (one process per model)"):
                for name, proc in procs.items():
                    while not is_up(urls[name]):
                        if proc.poll() is not None:
                            raise TaylorMLPError(f"the server of {name} ({targets[name][1]}) exited with status "
                                                 f"{proc.returncode} before answering: {_tail(log_paths[name])}")
                        if time.monotonic() > deadline:
                            raise TaylorMLPError(f"the server of {name} ({targets[name][1]}) did not answer within "
                                                 f"{startup_timeout_s:.0f} s")
                        time.sleep(0.5)
            yield urls
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)  # ReleaseServer.run: finish, stop the batching worker, exit
            for proc in procs.values():
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def serve_timings(urls: dict[str, str], prompt: str, chat: bool, options: ServeOptions, repeats: int,
                  run=drive) -> dict[int, dict[str, list[dict]]]:
    """Every model at every concurrency, `repeats` times, interleaved (one warm-up run each): per concurrency, per
    name the run summaries.  `run`: drive's signature (tests inject timings)."""
    sizes = list(dict.fromkeys(int(c) for c in options.concurrency))
    runs = interleaved({(c, name): (lambda c=c, name=name: run(urls[name], name, prompt, chat, c, options.requests,
                                                               options.tokens))
                        for c in sizes for name in urls}, repeats, "serving (interleaved)")
    return {c: {name: runs[(c, name)] for name in urls} for c in sizes}


def serve_rows(timings: dict[int, dict[str, list[dict]]], original: str) -> list[dict]:
    """Rows of the server-mode table, one per concurrency and model: medians over the rounds, and the slowdown
    (the original's output tokens/s over this model's: median and range of the same-round ratios)."""
    rows = []
    for concurrency, runs in sorted(timings.items()):
        for name, model_runs in runs.items():
            paired = paired_ratios(runs[original], model_runs, "output_tokens_per_s")
            tps = statistics.median(r["output_tokens_per_s"] for r in model_runs)
            rows.append({
                "concurrency": concurrency,
                "name": name,
                "kind": "original" if name == original else "release",
                "requests_per_s": statistics.median(r["requests_per_s"] for r in model_runs),
                "output_tokens_per_s": tps,
                "slowdown": statistics.median(paired),
                "slowdown_min": min(paired),
                "slowdown_max": max(paired),
                "throughput_vs_original": 1.0 / statistics.median(paired),
                "ttft_ms": statistics.median(r["ttft_s"] for r in model_runs) * 1e3,
                "inter_token_ms": statistics.median(r["inter_token_s"] for r in model_runs) * 1e3,
                "tokens_per_request": statistics.mean(r["output_tokens"] / r["requests"] for r in model_runs),
                "tokens_requested_per_request": model_runs[0]["tokens_requested"] / model_runs[0]["requests"],
                "peak_in_flight": min(r["peak_in_flight"] for r in model_runs),
                "runs": model_runs,
            })
    return rows


def serve_bench(targets: dict[str, tuple[str, str]], original: str, prompt: str, chat: bool, prompt_tokens: int,
                options: ServeOptions, repeats: int, threads: int) -> dict:
    """The server mode of `taylormlp bench`: serve every target (name -> (kind, path)), drive them interleaved,
    return the results section ("serve" in bench's JSON)."""
    kv_tokens = kv_cache_tokens(max(options.concurrency), prompt_tokens, options.tokens)
    with served_models(targets, kv_tokens, threads) as urls:
        log(f"serving: concurrency {', '.join(map(str, options.concurrency))}; {options.requests} request(s) per "
            f"client per run, {options.tokens} tokens each (EOS ignored), {repeats} interleaved repeats")
        timings = serve_timings(urls, prompt, chat, options, repeats)
    return {"concurrency": sorted(set(options.concurrency)), "requests_per_client": options.requests,
            "max_tokens": options.tokens, "repeats": repeats, "endpoint": "chat" if chat else "completions",
            "kv_cache_tokens": kv_tokens, "server_threads": threads, "rows": serve_rows(timings, original)}
