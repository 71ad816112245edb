"""`taylormlp compare`: greedy generations of the original and a release on a prompt file, token by token."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..common.errors import TaylorMLPError
from ..common.files import read_json
from ..common.progress import bar
from ..release.sources import is_chat_model, load_any, load_base
from .decode import first_divergence
from .generate import check_prompt, generate_ids

PROMPT_FILE_SHAPE = ('{"prompts": [{"kind": "chat" or "raw", "text": "..."}, ...]} (or a list of such objects or of '
                     'strings)')


def read_prompts(path: Path) -> list[dict]:
    """The prompts of a prompt file; any other shape is a TaylorMLPError naming the file and the expected shape."""
    path = Path(path)
    if not path.is_file():
        raise TaylorMLPError(f"prompt file {path} not found" + (" (it is a directory)" if path.is_dir() else "")
                             + f"; give a JSON file {PROMPT_FILE_SHAPE}")
    data = read_json(path, f"give a JSON file {PROMPT_FILE_SHAPE}", f"prompt file {path}", kind=None)
    if isinstance(data, dict):
        if "prompts" not in data:
            raise TaylorMLPError(f"prompt file {path} has no 'prompts' list (keys: {', '.join(map(str, data)) or 'none'}"
                                 f"); give {PROMPT_FILE_SHAPE}")
        prompts = data["prompts"]
    else:
        prompts = data
    if not isinstance(prompts, list):
        raise TaylorMLPError(f"prompt file {path}: the prompts are a JSON {type(prompts).__name__}, not a list; give "
                             f"{PROMPT_FILE_SHAPE}")
    out = []
    for k, item in enumerate(prompts):
        if isinstance(item, str):
            item = {"kind": "raw", "text": item}
        if not isinstance(item, dict):
            raise TaylorMLPError(f"prompt file {path}: prompt {k} is a JSON {type(item).__name__} ({str(item)[:40]}), "
                                 f"not an object or a string; give {PROMPT_FILE_SHAPE}")
        if item.get("kind") not in ("chat", "raw") or not isinstance(item.get("text"), str) or not item["text"]:
            raise TaylorMLPError(f"prompt file {path}: prompt {k} needs kind 'chat' or 'raw' and a non-empty text "
                                 f"string, got {str(item)[:80]}")
        check_prompt(item["text"], f"prompt file {path}: prompt {k}")
        out.append(item)
    if not out:
        raise TaylorMLPError(f"prompt file {path} holds no prompts; give {PROMPT_FILE_SHAPE}")
    return out


@torch.no_grad()
def compare(source, release, prompts: list[dict], max_new_tokens: int = 64) -> dict:
    original, tokenizer, _ = load_base(source)
    protected, _ = load_any(release)
    rows = []
    t_orig = t_prot = 0.0
    for k, item in enumerate(bar(prompts, desc="comparing", unit="prompt")):
        chat = item["kind"] == "chat"
        if chat and not is_chat_model(tokenizer):
            raise TaylorMLPError(f"prompt {k} is a 'chat' prompt but the model has no chat template; make it 'raw'")
        start = time.perf_counter()
        try:
            a, _ = generate_ids(original, tokenizer, item["text"], chat, max_new_tokens)
        except TaylorMLPError as exc:
            raise TaylorMLPError(f"prompt {k} ({item['text'][:30]!r}...): {exc}") from exc
        t_orig += time.perf_counter() - start
        start = time.perf_counter()
        b, _ = generate_ids(protected, tokenizer, item["text"], chat, max_new_tokens)
        t_prot += time.perf_counter() - start
        rows.append({"kind": item["kind"], "prompt": item["text"], "identical": bool(torch.equal(a, b)),
                     "tokens_original": len(a), "tokens_release": len(b), "first_divergence": first_divergence(a, b),
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
