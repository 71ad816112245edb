"""A workload: what a user's requests look like, P prompt tokens then G generated ones, and the three slowdowns a
release's users pay on it.

A request costs a prefill (the whole prompt in one forward, to the first generated token: the time to first token)
and then G − 1 single-token decode steps.  Prefill is compute-bound (P tokens through every matmul at once), decode
mostly memory-bound at small batches, so a release's slowdown differs between the two, and what a user pays is the
whole request's.  Per batch size B (B distinct prompts of P tokens each, decoded together) and model:

    prefill slowdown   prefill time / the original's
    decode slowdown    decode time / the original's
    request slowdown   (prefill + decode) time / the original's

each the median over interleaved rounds of the per-round (paired) ratio, as every slowdown here (decode.phase_ratios;
the rows are throughput.throughput_rows', timed by engine_bench on any engine).
The prompts are cut from real text (common/corpus.py's prose), one distinct window of P tokens per sequence, so that
no engine can share work between the sequences of a batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..common.choices import parse_workload
from ..common.corpus import stdlib_prose
from ..common.errors import TaylorMLPError
from ..common.paths import write_text_atomically
from ..common.progress import log
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


def report_workload(results: dict, json_path=None, plot_path=None) -> dict:
    """Print the workload table; write the JSON and the plot where asked (atomically)."""
    print(format_workload(results))
    if json_path is not None:
        log(f"wrote {write_text_atomically(Path(json_path), json.dumps(results, indent=1), '--json')}")
    if plot_path is not None:
        log(f"wrote {plot_workload(results, plot_path)}")
    return results
