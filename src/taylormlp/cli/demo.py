"""`taylormlp demo` / `make demo`: protect SmolLM2 and show original vs protected side by side."""

from __future__ import annotations

import shutil
import textwrap
import time
from pathlib import Path

import torch

from ..common.errors import TaylorMLPError
from ..measure.decode import first_divergence
from ..measure.generate import generate_ids
from ..protection.flow import protect_to_release
from ..release.directory import check_output_dir, load_release, verify_release
from ..release.kinds import is_release
from ..release.sources import load_base

DEMO_SOURCE = "smollm2-135m-instruct"
DEMO_PROMPTS = [
    ("chat", "What are the benefits of drinking water?"),
    ("chat", "Write a short story about a robot who learns to paint."),
    ("raw", "The three most important inventions of the twentieth century are"),
    ("chat", "How do airplanes stay in the air?"),
]


def _timed_generate(model, tokenizer, prompt, chat, max_new_tokens):
    start = time.perf_counter()
    ids, _ = generate_ids(model, tokenizer, prompt, chat, max_new_tokens)
    return ids, time.perf_counter() - start


def run_demo(out: Path, preset: str = "paper", max_new_tokens: int = 48, force: bool = False) -> dict:
    out = Path(out)
    reuse = out.is_dir() and not force
    if reuse:  # an existing release is used as it is; anything else there is left alone, never replaced
        try:
            verify_release(out)
        except TaylorMLPError as exc:
            fix = (", or pass --force to rebuild it" if is_release(out) or not any(out.iterdir()) else
                   " (--force replaces only an earlier release or an empty directory)")
            raise TaylorMLPError(f"--out {out} exists and is not a usable release ({exc}); choose another --out{fix}"
                                 ) from exc
        print(f"using existing release {out} (pass --force to rebuild)")
    else:
        check_output_dir(out, force)  # a file, or a directory that is not a release (even with --force): refused
        print(f"protecting {DEMO_SOURCE} with --preset {preset} into {out} ...")
        protect_to_release(DEMO_SOURCE, out, preset=preset, force=force)
    original, tokenizer, _ = load_base(DEMO_SOURCE)
    release = load_release(out)
    spec = release.config.taylormlp
    width = min(shutil.get_terminal_size((160, 20)).columns, 200)
    col = (width - 3) // 2
    matched_prompts = 0
    t_orig = t_prot = 0.0
    rows = []
    with torch.no_grad():
        for kind, prompt in DEMO_PROMPTS:
            chat = kind == "chat"
            a, ta = _timed_generate(original, tokenizer, prompt, chat, max_new_tokens)
            b, tb = _timed_generate(release, tokenizer, prompt, chat, max_new_tokens)
            t_orig, t_prot = t_orig + ta, t_prot + tb
            same = first_divergence(a, b)  # tokens matched: those before the first divergence
            exact = len(a) == len(b) == same
            matched_prompts += exact
            rows.append((kind, prompt, tokenizer.decode(a, skip_special_tokens=True),
                         tokenizer.decode(b, skip_special_tokens=True), same, max(len(a), len(b)), exact))
    print()
    print(f"{'ORIGINAL':<{col}} | {'PROTECTED (TaylorMLP)':<{col}}")
    print("-" * width)
    for kind, prompt, ta, tb, same, total, exact in rows:
        print(f"[{kind}] {prompt}")
        left = textwrap.wrap(ta.replace("\n", " "), col) or [""]
        right = textwrap.wrap(tb.replace("\n", " "), col) or [""]
        for i in range(max(len(left), len(right))):
            l = left[i] if i < len(left) else ""
            r = right[i] if i < len(right) else ""
            print(f"{l:<{col}} | {r:<{col}}")
        print(f"  tokens matched: {same}/{total} {'(identical)' if exact else '(DIFFERENT)'}")
        print("-" * width)
    ratio = t_prot / max(t_orig, 1e-9)
    print(f"release {out}: preset {spec.get('preset')}, basis {spec['basis']}, order {spec['order']}, "
          f"coverage {spec['coverage']:.4f} of MLP channels protected")
    print(f"identical generations: {matched_prompts}/{len(rows)} prompts; "
          f"latency ratio protected/original: {ratio:.2f}x ({t_prot:.1f}s vs {t_orig:.1f}s)")
    return {"identical": matched_prompts, "prompts": len(rows), "latency_ratio": ratio, "coverage": spec["coverage"]}
