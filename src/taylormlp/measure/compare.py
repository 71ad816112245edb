"""`taylormlp compare`: greedy generations of the original and a release on a prompt file, token by token.

Our runtime (`compare`) generates prompt by prompt in this process, stopping at EOS.  An engine that runs models
elsewhere (`compare_on_sessions`, e.g. `--engine vllm`) starts the original and the release as two sessions of the
engine (measure/engines.py), side by side, generates every prompt in one batch on each, greedily for exactly
--max-new-tokens tokens, and cuts each continuation after its first EOS: the same tokens a run stopping at EOS
gives, since greedy decoding does not look ahead.  Both give the same result shape.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import GenerationConfig

from ..common.errors import TaylorMLPError
from ..common.files import read_json
from ..common.progress import bar, log
from ..release.directory import verify_release
from ..release.sources import is_chat_model, load_any, load_base, load_tokenizer, resolve_source
from .decode import first_divergence
from .generate import check_prompt, encode_prompt, eos_ids, generate_ids, until_eos

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


def _check_chat(k: int, item: dict, tokenizer) -> bool:
    chat = item["kind"] == "chat"
    if chat and not is_chat_model(tokenizer):
        raise TaylorMLPError(f"prompt {k} is a 'chat' prompt but the model has no chat template; make it 'raw'")
    return chat


def _row(item: dict, a: list[int], b: list[int], tokenizer) -> dict:
    """One prompt's comparison: the two continuations (token ids), whether they are identical and where they part."""
    return {"kind": item["kind"], "prompt": item["text"], "identical": list(a) == list(b), "tokens_original": len(a),
            "tokens_release": len(b), "first_divergence": first_divergence(a, b),
            "original": tokenizer.decode(a, skip_special_tokens=True),
            "release": tokenizer.decode(b, skip_special_tokens=True)}


def _result(source, release, spec: dict, max_new_tokens: int, rows: list[dict], ratio: float, **more) -> dict:
    return {"source": str(source), "release": str(release), "max_new_tokens": max_new_tokens,
            "coverage": spec["coverage"], "order": spec["order"], "basis": spec["basis"], "preset": spec.get("preset"),
            **more, "identical": sum(r["identical"] for r in rows), "prompts": len(rows), "latency_ratio": ratio,
            "rows": rows}


@torch.no_grad()
def compare(source, release, prompts: list[dict], max_new_tokens: int = 64) -> dict:
    original, tokenizer, _ = load_base(source)
    protected, _ = load_any(release)
    rows = []
    t_orig = t_prot = 0.0
    for k, item in enumerate(bar(prompts, desc="comparing", unit="prompt")):
        chat = _check_chat(k, item, tokenizer)
        start = time.perf_counter()
        try:
            a, _ = generate_ids(original, tokenizer, item["text"], chat, max_new_tokens)
        except TaylorMLPError as exc:
            raise TaylorMLPError(f"prompt {k} ({item['text'][:30]!r}...): {exc}") from exc
        t_orig += time.perf_counter() - start
        start = time.perf_counter()
        b, _ = generate_ids(protected, tokenizer, item["text"], chat, max_new_tokens)
        t_prot += time.perf_counter() - start
        rows.append(_row(item, a.tolist(), b.tolist(), tokenizer))
    return _result(source, release, protected.config.taylormlp, max_new_tokens, rows, t_prot / max(t_orig, 1e-9))


def compare_on_sessions(engine, request, workdir=None) -> dict:
    """`compare` on `engine`'s sessions (measure/engines.Engine; `request` a CompareRequest): see the module's
    docstring.  The result records the engine and the dtype it ran; latency_ratio is the release's batch over the
    original's."""
    engine.require()
    spec = verify_release(request.release)["taylormlp"]
    source_dir = resolve_source(request.source)
    tokenizer = load_tokenizer(source_dir)
    ids = [encode_prompt(tokenizer, item["text"], _check_chat(k, item, tokenizer))[0].tolist()
           for k, item in enumerate(request.prompts)]
    length = max(512, max(map(len, ids)) + request.max_new_tokens + 16)  # the longest prompt and every new token
    own_workdir = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix=f"{engine.name}-compare-"))
    sessions, tokens, seconds = {}, {}, {}
    try:
        for name, path in (("original", source_dir), ("release", request.release)):
            log(f"starting {engine.name} for the {name} ({request.dtype}) ...")
            sessions[name] = engine.start(path, workdir / f"{name}.log", dtype=request.dtype, max_model_len=length)
        for name, session in sessions.items():
            start = time.perf_counter()
            tokens[name] = session.generate(ids, request.max_new_tokens)
            seconds[name] = time.perf_counter() - start
        info = sessions["release"].info
    finally:
        for session in sessions.values():
            session.close()
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    try:  # the original's own stopping tokens too: where our runtime's generate stops
        generation = GenerationConfig.from_pretrained(source_dir)
    except OSError:  # it ships none
        generation = None
    eos = eos_ids(tokenizer, SimpleNamespace(generation_config=generation))
    rows = [_row(item, until_eos(a, eos), until_eos(b, eos), tokenizer)
            for item, a, b in zip(request.prompts, tokens["original"], tokens["release"])]
    return _result(request.source, request.release, spec, request.max_new_tokens, rows,
                   seconds["release"] / max(seconds["original"], 1e-9),
                   engine={"name": engine.name, "version": info.get("version"), "dtype": info.get("dtype"),
                           "model_class": info.get("model_class")})


def print_comparison(result: dict) -> None:
    print(f"{'kind':5} {'same':5} {'diverges at':>11}  prompt")
    for r in result["rows"]:
        where = "-" if r["identical"] else str(r["first_divergence"])
        print(f"{r['kind']:5} {'yes' if r['identical'] else 'NO':5} {where:>11}  {r['prompt'][:70]}")
    print(f"identical greedy generations: {result['identical']}/{result['prompts']} "
          f"({result['max_new_tokens']} new tokens); coverage {result['coverage']:.4f}, order {result['order']}, "
          f"basis {result['basis']}; wall-time ratio release/original {result['latency_ratio']:.2f}x")
