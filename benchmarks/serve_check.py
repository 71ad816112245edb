"""Issue 17's server check on a real release: `taylormlp serve RELEASE` answers concurrent greedy chats with what
load_release + generate give on the same chat template, refuses a malformed request with a 4xx and keeps serving,
and stops on Ctrl-C.

    .venv/bin/python benchmarks/serve_check.py                                   # releases/smollm2-default
    .venv/bin/python benchmarks/serve_check.py --release releases/smollm2-4x --json results/serve-check-smollm2-4x.json
    .venv-vllm/bin/python benchmarks/serve_check.py --engine vllm --json results/serve-check-smollm2-default-vllm.json

The server runs as its own process (the command a user types, continuous batching); the requests go through the
`openai` client, all at once from threads; the reference generations are made afterwards in this process
(taylormlp.measure.generate.generate_ids: chat template, greedy).  Writes the JSON atomically; exit status 1 if any check
fails.  Chat prompts: the first --concurrency chat prompts of benchmarks/prompts_smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from openai import OpenAI

from taylormlp.common.choices import engine_names  # torch-free

try:  # the HTTP client openai uses (httpx2 in newer releases)
    import httpx2 as httpx
except ImportError:  # older openai releases
    import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, timeout_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            raise SystemExit(f"taylormlp serve exited with {proc.returncode} before answering")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"taylormlp serve did not answer within {timeout_s} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--release", type=Path, default=ROOT / "releases/smollm2-default")
    ap.add_argument("--json", type=Path, default=ROOT / "results/serve-check-smollm2-default.json")
    ap.add_argument("--prompts", type=Path, default=ROOT / "benchmarks/prompts_smollm2.json")
    ap.add_argument("--concurrency", type=int, default=4, help="concurrent chat requests (default 4)")
    ap.add_argument("--max-tokens", type=int, default=24, help="max_tokens of each request (default 24)")
    engines = engine_names("serve")  # the engines `taylormlp serve` offers (common/choices.ENGINES), default first
    ap.add_argument("--engine", choices=engines, default=engines[0],
                    help=f"taylormlp serve's engine (default {engines[0]}), run in float32, the dtype load_release "
                         f"runs in")
    ap.add_argument("--startup-timeout", type=float, default=900, help="seconds to wait for the server (default 900)")
    args = ap.parse_args()

    from taylormlp.common.paths import dump_json
    from taylormlp.measure.generate import generate_ids
    from taylormlp.release.sources import load_any  # after parsing: --help needs no torch

    chats = [p["text"] for p in json.loads(args.prompts.read_text())["prompts"] if p["kind"] == "chat"]
    chats = chats[:args.concurrency]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="serve-check-")) / "server.log"
    cmd = [sys.executable, "-m", "taylormlp.cli", "serve", str(args.release), "--port", str(port)]
    cmd += ["--engine", args.engine, "--dtype", "float32"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, env={**os.environ, "TAYLORMLP_QUIET": "1"})
    try:
        startup_s = wait_until_up(url, proc, args.startup_timeout)
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=1800)
        name = args.release.resolve().name
        listed = [m.id for m in client.models.list().data]

        def ask(prompt):
            answer = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                                    max_tokens=args.max_tokens, temperature=0)
            return answer.choices[0].message.content, answer.usage.completion_tokens, answer.usage.prompt_tokens

        start = time.monotonic()
        with ThreadPoolExecutor(len(chats)) as pool:
            served = list(pool.map(ask, chats))
        concurrent_s = time.monotonic() - start
        bad = httpx.post(f"{url}/v1/chat/completions", json={"model": name, "messages": "not a list"}, timeout=60)
        after_bad = ask(chats[0])
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    stopped = proc.returncode == 0  # every engine's server exits 0 on SIGINT once it has stopped

    model, tokenizer = load_any(args.release)
    reference = []
    for prompt in chats:
        new, prompt_len = generate_ids(model, tokenizer, prompt, chat=True, max_new_tokens=args.max_tokens)
        reference.append((tokenizer.decode(new, skip_special_tokens=True), int(new.numel()), prompt_len))
    rows = [{"prompt": p, "served": s[0], "reference": r[0], "identical": s == r, "served_tokens": s[1],
             "reference_tokens": r[1], "prompt_tokens": [s[2], r[2]]} for p, s, r in zip(chats, served, reference)]
    result = {
        "release": str(args.release), "command": " ".join(cmd[1:]), "concurrency": len(chats),
        "max_tokens": args.max_tokens, "identical": sum(row["identical"] for row in rows), "requests": len(rows),
        "listed_models": listed, "startup_s": round(startup_s, 1), "concurrent_wall_s": round(concurrent_s, 2),
        "malformed_request_status": bad.status_code, "malformed_request_detail": bad.text[:300],
        "answered_after_malformed": after_bad == served[0], "stopped_cleanly_on_sigint": stopped,
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}, "rows": rows,
    }
    ok = (result["identical"] == len(rows) and listed == [name] and 400 <= bad.status_code < 500
          and result["answered_after_malformed"] and stopped)
    result["passed"] = ok
    dump_json(result, args.json, "--json")
    print(f"{result['identical']}/{len(rows)} served chats identical to load_release + generate; malformed request "
          f"-> {bad.status_code}; answered after it: {result['answered_after_malformed']}; stopped cleanly: "
          f"{stopped}; {len(rows)} concurrent requests in {concurrent_s:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
