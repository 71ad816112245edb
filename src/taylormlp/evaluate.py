"""`taylormlp compare`: greedy generations of the original and a release on a prompt file, token by token."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .errors import TaylorMLPError
from .pipeline import generate_ids, load_any
from .progress import bar
from .sources import is_chat_model, load_base


def read_prompts(path: Path) -> list[dict]:
    if not Path(path).is_file():
        raise TaylorMLPError(f"prompt file {path} not found")
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise TaylorMLPError(f"prompt file {path} is not valid JSON: {exc}") from exc
    prompts = data["prompts"] if isinstance(data, dict) else data
    out = []
    for item in prompts:
        if isinstance(item, str):
            item = {"kind": "raw", "text": item}
        if item.get("kind") not in ("chat", "raw") or not item.get("text"):
            raise TaylorMLPError(f"prompt file {path}: each prompt needs kind 'chat' or 'raw' and a text, got {item}")
        out.append(item)
    if not out:
        raise TaylorMLPError(f"prompt file {path} holds no prompts")
    return out


@torch.no_grad()
def compare(source, release, prompts: list[dict], max_new_tokens: int = 64) -> dict:
    original, tokenizer, _ = load_base(source)
    protected, _ = load_any(release)
    rows = []
    t_orig = t_prot = 0.0
    for item in bar(prompts, desc="comparing", unit="prompt"):
        chat = item["kind"] == "chat"
        if chat and not is_chat_model(tokenizer):
            raise TaylorMLPError("a 'chat' prompt was given but the model has no chat template")
        start = time.perf_counter()
        a, _ = generate_ids(original, tokenizer, item["text"], chat, max_new_tokens)
        t_orig += time.perf_counter() - start
        start = time.perf_counter()
        b, _ = generate_ids(protected, tokenizer, item["text"], chat, max_new_tokens)
        t_prot += time.perf_counter() - start
        n = min(len(a), len(b))
        prefix = int(n if bool((a[:n] == b[:n]).all()) else int((a[:n] != b[:n]).nonzero()[0, 0]))
        rows.append({"kind": item["kind"], "prompt": item["text"], "identical": bool(torch.equal(a, b)),
                     "tokens_original": len(a), "tokens_release": len(b), "first_divergence": prefix,
                     "original": tokenizer.decode(a, skip_special_tokens=True),
                     "release": tokenizer.decode(b, skip_special_tokens=True)})
    spec = protected.config.taylormlp
    return {"source": str(source), "release": str(release), "max_new_tokens": max_new_tokens,
            "coverage": spec["coverage"], "order": spec["order"], "basis": spec["basis"], "preset": spec.get("preset"),
            "identical": sum(r["identical"] for r in rows), "prompts": len(rows),
            "latency_ratio": t_prot / max(t_orig, 1e-9), "rows": rows}


def print_comparison(result: dict) -> None:
    print(f"{'kind':5} {'same':5} {'diverges at':>11}  prompt")
    for r in result["rows"]:
        where = "-" if r["identical"] else str(r["first_divergence"])
        print(f"{r['kind']:5} {'yes' if r['identical'] else 'NO':5} {where:>11}  {r['prompt'][:70]}")
    print(f"identical greedy generations: {result['identical']}/{result['prompts']} "
          f"({result['max_new_tokens']} new tokens); coverage {result['coverage']:.4f}, order {result['order']}, "
          f"basis {result['basis']}; wall-time ratio release/original {result['latency_ratio']:.2f}x")
