"""A workload: what a user's requests look like, P prompt tokens then G generated ones, and the three slowdowns a
release's users pay on it.

A request costs a prefill (the whole prompt in one forward, to the first generated token: the time to first token)
and then G − 1 single-token decode steps.  Prefill is compute-bound (P tokens through every matmul at once), decode
mostly memory-bound at small batches, so a release's slowdown differs between the two, and what a user pays is the
whole request's.  Per batch size B (B distinct prompts of P tokens each, decoded together) and model:

    prefill slowdown   prefill time / the original's
    decode slowdown    decode time / the original's
    request slowdown   (prefill + decode) time / the original's

each the median over interleaved rounds of the per-round (paired) ratio, as every slowdown here (decode.paired_ratios).
The prompts are cut from real text (common/corpus.py's prose), one distinct window of P tokens per sequence, so that
no engine can share work between the sequences of a batch.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from ..common import machine
from ..common.choices import parse_workload
from ..common.corpus import stdlib_prose
from ..common.errors import TaylorMLPError
from ..common.paths import write_text_atomically
from ..common.progress import log
from .bench import ORIGINAL, load_models
from .cost import flops_per_token, forward_flops
from .decode import batch_timings, phase_ratios, phase_seconds
from .report import format_workload, plot_workload

@dataclass(frozen=True)
class Workload:
    """P prompt tokens, then G generated tokens (the first from the prefill, G − 1 decode steps)."""

    prompt_tokens: int
    new_tokens: int

    def __post_init__(self):
        parse_workload(self.label)  # the limits, with the message --workload gives

    @property
    def label(self) -> str:
        return f"{self.prompt_tokens}:{self.new_tokens}"

    @classmethod
    def parse(cls, text: str) -> "Workload":
        """'P:G' (e.g. 512:128), as --workload takes it (common/choices.parse_workload)."""
        return cls(*parse_workload(text))

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens}


def workload_prompts(tokenizer, prompt_tokens: int, count: int) -> list[list[int]]:
    """`count` distinct prompts of exactly `prompt_tokens` token ids each: consecutive windows of the corpus prose
    tokenized as one stream (each window starting with the tokenizer's BOS where it adds one)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and tokenizer(
        "a").input_ids[:1] == [tokenizer.bos_token_id] else []
    width = prompt_tokens - len(bos)
    need = width * count
    text = "\n\n".join(stdlib_prose(max_chars=max(200_000, 8 * need)))  # ~4 characters a token, twice over
    stream = tokenizer(text, add_special_tokens=False).input_ids
    if len(stream) < need:
        raise TaylorMLPError(f"the built-in prose holds {len(stream)} tokens, fewer than {count} prompts of "
                             f"{prompt_tokens} tokens: use a smaller --prompt-tokens or fewer sequences")
    return [bos + stream[k * width:(k + 1) * width] for k in range(count)]


def workload_rows(runs: dict, original: str, workload: Workload) -> list[dict]:
    """Per batch size and model, from timed runs ({batch: {name: [run dicts with prefill_s and decode_s], in round
    order}}): the medians of prefill, decode and request time, and the three slowdowns (median of paired ratios, with
    their range)."""
    rows = []
    for batch in sorted(runs):
        base = runs[batch][original]
        for name, mine in runs[batch].items():
            row = {"batch": batch, "name": name, "kind": "original" if name == original else "release",
                   **workload.as_dict()}
            for phase, ratios in phase_ratios(mine, base).items():
                row.update({f"{phase}_s": statistics.median(phase_seconds(r, phase) for r in mine),
                            f"{phase}_slowdown": statistics.median(ratios),
                            f"{phase}_slowdown_min": min(ratios), f"{phase}_slowdown_max": max(ratios)})
            row["request_tokens_per_s"] = batch * workload.new_tokens / row["request_s"]
            rows.append(row)
    return rows


def work_model(models: dict, original: str, prompt: list[int]) -> dict[str, dict]:
    """Per release: the FLOPs of one decode step and of the prefill of `prompt` over the original's (cost.py's
    counts: the ratios a compute-bound engine would pay)."""
    decode = {name: flops_per_token(m, prompt[0]) for name, m in models.items()}
    prefill = {name: forward_flops(m, prompt) for name, m in models.items()}
    return {name: {"flops_ratio": decode[name] / decode[original],
                   "prefill_flops_ratio": prefill[name] / prefill[original]} for name in models if name != original}


def run_workload_bench(source, releases, workload: Workload, batch_sizes=(1,), repeats: int = 3, json_path=None,
                       plot_path=None, device: str = "cpu") -> dict:
    """`taylormlp bench --prompt-tokens P --new-tokens G` on our runtime: every model and batch size timed in one
    interleaved run (decode.batch_timings on B distinct prompts of P tokens, G − 1 decode steps after the prefill),
    then workload_rows; printed as a table, written as JSON and a plot."""
    device = machine.resolve_device(device)
    sizes = sorted({1, *(int(b) for b in batch_sizes)})
    models, _paths, tokenizer, _dtype = load_models(source, releases, device)
    prompts = workload_prompts(tokenizer, workload.prompt_tokens, max(sizes))
    log(f"workload {workload.label}: {max(sizes)} distinct prompts of {workload.prompt_tokens} tokens, "
        f"{workload.new_tokens} generated tokens each; batch sizes {', '.join(map(str, sizes))}, {repeats} "
        f"interleaved repeats, {torch.get_num_threads()} torch threads")
    work = work_model(models, ORIGINAL, prompts[0])
    runs = batch_timings(models, torch.tensor(prompts), workload.new_tokens - 1, repeats, sizes)
    results = {"engine": "taylormlp", "source": str(source), "workload": workload.as_dict(), "batch_sizes": sizes,
               "repeats": repeats, "machine": machine.describe(device),
               "models": [{"name": ORIGINAL, "kind": "original"}]
               + [{"name": name, "kind": "release", **work[name]} for name in work],
               "rows": workload_rows(runs, ORIGINAL, workload)}
    return report_workload(results, json_path, plot_path)


def report_workload(results: dict, json_path=None, plot_path=None) -> dict:
    """Print the workload table; write the JSON and the plot where asked (atomically)."""
    print(format_workload(results))
    if json_path is not None:
        log(f"wrote {write_text_atomically(Path(json_path), json.dumps(results, indent=1), '--json')}")
    if plot_path is not None:
        log(f"wrote {plot_workload(results, plot_path)}")
    return results
