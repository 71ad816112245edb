"""Running a model over token sequences: batching, teacher-forced logits and token matching, the first divergence of
two generations, greedy decoding with the KV cache, and interleaved timing.  The one place protect's validation,
bench, the slowdown search, the audit, compare and the demo take these from.

Timing has one procedure and one statistic: ``interleaved`` calls every model once as a warm-up, then round robin
per repeat with the first model rotated from repeat to repeat; what is reported is the median over the repeats
(``timing_summary``), and a slowdown's range or median is taken over the per-repeat (paired) ratios.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..common.choices import PHASES
from ..common.progress import bar


def input_device(model) -> torch.device:
    """Where the model's input ids go: its input embeddings' device, or, where accelerate offloaded them (weights on
    the meta device, read back from disk at each forward), the device its hook runs them on."""
    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device
    if device.type == "meta":
        hook = getattr(embeddings, "_hf_hook", None)
        device = torch.device(getattr(hook, "execution_device", None) or "cpu")
    return device


def padded_batches(sequences: list[torch.Tensor], max_tokens: int, side: str = "right", sort: bool = True,
                   first_tokens: int | None = None):
    """Batches of at most `max_tokens` (padded) tokens, length-sorted unless sort=False (then in list order):
    yields (indices, ids, attention_mask).  With `first_tokens`, the first batch holds at most that many tokens
    and each next one twice as many (up to max_tokens): a walk that may stop early stops after little work."""
    order = list(range(len(sequences)))
    if sort:
        order.sort(key=lambda k: len(sequences[k]))
    limit = min(first_tokens or max_tokens, max_tokens)
    batch: list[int] = []
    for k in order + [None]:
        if k is not None and (not batch or
                              (len(batch) + 1) * max(len(sequences[j]) for j in batch + [k]) <= limit):
            batch.append(k)
            continue
        if batch:
            width = max(len(sequences[j]) for j in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, j in enumerate(batch):
                n = len(sequences[j])
                sl = slice(0, n) if side == "right" else slice(width - n, width)
                ids[row, sl] = sequences[j]
                mask[row, sl] = 1
            yield batch, ids, mask
            limit = min(2 * limit, max_tokens)
        batch = [k] if k is not None else []


@torch.no_grad()
def continuation_logits(model, seqs: list[dict], max_tokens: int = 4096, sort: bool = True,
                        first_tokens: int | None = None):
    """Yields (k, logits) for every sequence k, batch by batch (not in list order): the logits at the positions
    that predict its continuation, [K, V] float32.

    Sequences run in length-sorted, left-padded batches with explicit position ids (padding changes nothing);
    the vocabulary projection runs only on the last positions.  Stop iterating to skip the remaining batches."""
    device = input_device(model)
    for idx, ids, mask in padded_batches([s["ids"] for s in seqs], max_tokens, side="left", sort=sort,
                                         first_tokens=first_tokens):
        keep = max(len(seqs[k]["ids"]) - seqs[k]["prompt_len"] + 1 for k in idx)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device),
                    use_cache=False, logits_to_keep=keep).logits.float().cpu()
        for row, k in enumerate(idx):
            K = len(seqs[k]["ids"]) - seqs[k]["prompt_len"]
            yield k, out[row, keep - K - 1:-1].clone()
        del out


# ---------------------------------------------------------------- teacher-forced token matching


def agreement(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per position, whether the argmax of `logits` [K, V] is the target token: `target` is the token ids [K] or the
    reference model's logits [K, V] (then their argmax).  All true ⇔ the same greedy continuation."""
    want = target.argmax(-1) if target.dim() == logits.dim() else target
    return logits.argmax(-1) == want.to(logits.device)


@dataclass
class TokenMatch:
    """Running counts of teacher-forced agreement, one `add` per sequence."""

    tokens_matched: int = 0
    tokens: int = 0
    sequences_exact: int = 0
    seen: int = 0

    def add(self, same: torch.Tensor) -> bool:
        """Count one sequence's per-position agreement; returns whether all of it agreed."""
        exact = bool(same.all())
        self.tokens_matched += int(same.sum())
        self.tokens += same.numel()
        self.sequences_exact += int(exact)
        self.seen += 1
        return exact

    def counts(self, sequences: int) -> dict:
        return {"tokens_matched": self.tokens_matched, "tokens": self.tokens, "sequences_exact": self.sequences_exact,
                "sequences": sequences}


def tokens_matched(model, reference: list[dict], max_tokens: int = 4096) -> dict:
    """Teacher-forced greedy agreement of `model` with reference continuations ({"ids": prompt + continuation,
    "prompt_len"}): {"tokens_matched", "tokens", "sequences_exact", "sequences"}."""
    count = TokenMatch()
    for k, logits in continuation_logits(model, reference, max_tokens):
        count.add(agreement(logits, reference[k]["ids"][reference[k]["prompt_len"]:]))
    return count.counts(len(reference))


@torch.no_grad()
def validate(model, validation: list[dict], max_tokens: int = 4096, budget: float | None = None,
             limit: int | None = None) -> dict:
    """Teacher-forced check on the original's greedy continuations: all argmaxes equal ⇔ identical greedy text.
    With a `budget`, walk the sequences in list order in small batches and stop at the first batch that proves
    failure (a token differs or an error exceeds it); the failing sequence moves to the front of `validation`,
    where the next, similar candidate is likely to fail too.  `limit` checks only the first `limit` sequences
    (the screen of largest_accepted)."""
    count = TokenMatch()
    max_err = 0.0
    failed = False
    early = budget is not None
    seqs = validation if limit is None else validation[:limit]
    for k, logits in continuation_logits(model, seqs, max_tokens, sort=not early,
                                         first_tokens=max_tokens // 16 if early else None):
        seq = validation[k]
        exact = count.add(agreement(logits, seq["logits"]))
        max_err = max(max_err, float((logits - seq["logits"]).abs().max()))
        if early and (not exact or max_err > budget):
            failed = True
            validation.insert(0, validation.pop(k))
            break
    result = {**count.counts(len(seqs)), "max_logit_error": max_err,
              "exact": count.tokens_matched == count.tokens and not failed}
    if failed:
        result["stopped_after"] = count.seen
    return result


def first_divergence(a, b) -> int:
    """The first position at which two token sequences differ; where one is a prefix of the other (equal sequences
    included), the shorter one's length."""
    a, b = torch.as_tensor(a).reshape(-1), torch.as_tensor(b).reshape(-1)
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0, 0]) if len(differ) else n


# ---------------------------------------------------------------- greedy decoding with the KV cache


def _forward_names(model) -> tuple[dict, str]:
    """Extra forward kwargs (logits of the last position only, where the model takes ``logits_to_keep``) and the name
    of the KV-cache argument (``cache`` in recent transformers, ``past_key_values`` before), read from the forward of
    the model itself or, for a peft-wrapped one, of its base model (peft passes both through)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        params = {}
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    return extra, ("cache" if "cache" in params else "past_key_values")


def _output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Decoded:
    """A greedy run: `ids` [B, prompt + new] on the CPU; with timing, the seconds of the prefill (the prompt's forward
    and the first argmax) and of the `new_tokens` − 1 single-token decode steps."""

    ids: torch.Tensor
    prompt_tokens: int
    prefill_s: float | None = None
    decode_s: float | None = None

    @property
    def new(self) -> torch.Tensor:
        return self.ids[:, self.prompt_tokens:]


@torch.no_grad()
def greedy(model, input_ids, new_tokens: int, timed: bool = False) -> Decoded:
    """Greedy decoding with the KV cache and no stopping rule (the same count of tokens for every model): one prefill
    forward on `input_ids` ([B, L] or [L], unpadded), then `new_tokens` − 1 single-token steps, each fed the previous
    argmax and the cache the previous forward returned.  `timed` times the prefill and the steps apart."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be at least 1, got {new_tokens}")
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[1] < 1:
        raise ValueError(f"input_ids must be non-empty sequences [B, L], got shape {tuple(ids.shape)}")
    device = input_device(model)
    extra, cache_arg = _forward_names(model)
    prompt_len = ids.shape[1]
    mask = torch.ones(ids.shape[0], prompt_len + new_tokens, dtype=torch.long, device=device)
    clock = time.perf_counter

    start = clock()
    out = model(input_ids=ids.to(device), attention_mask=mask[:, :prompt_len], use_cache=True, **extra)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    if timed:
        _sync(device)
    prefill_s = clock() - start

    past = _output_cache(out)
    new = [nxt]
    start = clock()
    for step in range(1, new_tokens):
        out = model(input_ids=nxt, attention_mask=mask[:, :prompt_len + step], use_cache=True,
                    **{cache_arg: past}, **extra)
        past = _output_cache(out)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        new.append(nxt)
    if timed:
        _sync(device)
    decode_s = clock() - start
    result = Decoded(torch.cat([ids.cpu(), torch.cat(new, 1).cpu()], 1), prompt_len)
    if timed:
        result.prefill_s, result.decode_s = prefill_s, decode_s
    return result


@torch.no_grad()
def one_step(model, input_ids, batch: int, around=None):
    """One cached single-token decode step of `batch` sequences, after a prefill of one prompt (its KV cache
    repeated `batch` times, as batch_ids would have built it, without prefilling `batch` copies): the step runs
    inside the context manager `around` (e.g. a work counter), nothing else does.  Returns the step's argmaxes."""
    ids = torch.as_tensor(input_ids).reshape(1, -1)
    device = input_device(model)
    extra, cache_arg = _forward_names(model)
    out = model(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), use_cache=True, **extra)
    past = _output_cache(out)
    past.batch_repeat_interleave(batch)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True).expand(batch, 1).contiguous()
    mask = torch.ones(batch, ids.shape[1] + 1, dtype=torch.long, device=device)
    with around if around is not None else contextlib.nullcontext():
        out = model(input_ids=nxt, attention_mask=mask, use_cache=True, **{cache_arg: past}, **extra)
        return out.logits[:, -1].argmax(-1)


def measure_decode(model, input_ids, new_tokens: int) -> dict:
    """Time ONE greedy run: prefill on `input_ids` (one sequence, or a batch [B, L] of equal-length ones, e.g.
    batch_ids), then exactly `new_tokens` single-token cached decode steps (each fed back the argmax tokens).

    Returns {"prefill_s" (the time to the first token), "decode_s", "decode_tokens_per_s" (over the whole batch:
    B · new_tokens / decode_s), "inter_token_s" (decode_s / new_tokens: every sequence gets one token per step),
    "prefill_tokens_per_s"} plus "batch", "prompt_tokens", "new_tokens" and "tokens" (the ids the decode steps fed
    back to the first sequence)."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be at least 1, got {new_tokens}")
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ValueError(f"input_ids must be non-empty sequences [B, L], got shape {tuple(ids.shape)}")
    run = greedy(model, ids, new_tokens + 1, timed=True)  # the last step's argmax is not fed back
    batch = ids.shape[0]
    return {
        "prefill_s": run.prefill_s,
        "decode_s": run.decode_s,
        "decode_tokens_per_s": batch * new_tokens / run.decode_s if run.decode_s > 0 else math.inf,
        "inter_token_s": run.decode_s / new_tokens,
        "prefill_tokens_per_s": batch * run.prompt_tokens / run.prefill_s if run.prefill_s > 0 else math.inf,
        "batch": batch,
        "prompt_tokens": run.prompt_tokens,
        "new_tokens": new_tokens,
        "tokens": run.new[0, :new_tokens].tolist(),
    }


def batch_ids(input_ids, batch: int) -> torch.Tensor:
    """[batch, L]: that many concurrent requests of equal length (no padding).  `input_ids` one prompt ([L] or
    [1, L]): `batch` copies of it (every row decodes the same greedy tokens); several prompts of one length ([K, L],
    K >= batch, e.g. a workload's distinct prompts): the first `batch` of them."""
    ids = torch.as_tensor(input_ids)
    ids = ids.reshape(1, -1) if ids.dim() < 2 else ids
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    if ids.shape[0] == 1:
        return ids.expand(batch, -1).contiguous()
    if ids.shape[0] < batch:
        raise ValueError(f"{ids.shape[0]} prompts for a batch of {batch}: give one prompt, or at least {batch}")
    return ids[:batch].contiguous()


# ---------------------------------------------------------------- interleaved timing


def interleaved(runs: dict[str, Callable[[], object]], repeats: int, desc: str | None = None,
                warm: list[Callable[[], object]] | None = None) -> dict[str, list]:
    """Call every run once as a warm-up (first-call allocations, lazy init, caches), or instead each of `warm` once
    (a cheaper warm-up of the same code, e.g. one short request per engine session), then `repeats` rounds that call
    every run once each, the first one rotating from round to round, so that slow phases of a shared machine fall on
    all of them alike.  Returns per name the results of its timed calls, in round order (index r pairs round r)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    names = list(runs)
    if not names:
        raise ValueError("nothing to time")
    for fn in warm if warm is not None else runs.values():
        fn()
    results: dict[str, list] = {name: [] for name in names}
    rounds = bar(range(repeats), desc=desc, unit="repeat") if desc else range(repeats)
    for r in rounds:
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            results[name].append(runs[name]())
    return results


def paired_ratios(runs: list, reference: list, key: str | None = None) -> list[float]:
    """Per round, a run's time over the reference's in that same round (`key` picks the time out of a result dict)."""
    pick = (lambda v: v) if key is None else (lambda v: v[key])
    return [pick(a) / pick(b) for a, b in zip(runs, reference)]




def phase_seconds(run: dict, phase: str) -> float:
    """A timed run's seconds in one of PHASES (run: {"prefill_s", "decode_s", ...}, as measure_decode returns)."""
    return run["prefill_s"] + run["decode_s"] if phase == "request" else run[f"{phase}_s"]


def phase_ratios(runs: list[dict], reference: list[dict]) -> dict[str, list[float]]:
    """Per phase (PHASES), the per-round paired ratios of runs to the reference's: the statistic of every slowdown
    is their median (and their range)."""
    return {phase: paired_ratios([phase_seconds(r, phase) for r in runs], [phase_seconds(r, phase) for r in reference])
            for phase in PHASES}


def batch_timings(models: dict, input_ids, new_tokens: int, repeats: int, batch_sizes=(1,),
                  desc: str | None = "timing (interleaved)") -> dict[int, dict[str, list[dict]]]:
    """`measure_decode` of every model at every batch size (`input_ids`: one prompt, repeated by batch_ids),
    `repeats` times, all of them interleaved in one run (one warm-up run each): per batch size, per name the run
    dicts, without their token lists."""
    def run(model, ids):
        res = measure_decode(model, ids, new_tokens)
        res.pop("tokens")
        return res
    sizes = list(dict.fromkeys(int(b) for b in batch_sizes))
    ids = {b: batch_ids(input_ids, b) for b in sizes}
    runs = interleaved({(b, name): (lambda m=model, x=ids[b]: run(m, x)) for b in sizes
                        for name, model in models.items()}, repeats, desc)
    return {b: {name: runs[(b, name)] for name in models} for b in sizes}


def decode_timings(models: dict, input_ids, new_tokens: int, repeats: int,
                   desc: str | None = "timing (interleaved)") -> dict[str, list[dict]]:
    """`measure_decode` of every model on one prompt, `repeats` times, interleaved (one warm-up run each): per name
    the run dicts, without their token lists (batch_timings at batch 1)."""
    return batch_timings(models, input_ids, new_tokens, repeats, (1,), desc)[1]


def timing_summary(runs: list[dict]) -> dict:
    """The statistic of every decode timing: medians over the repeats, and spreads (max − min)."""
    decode = [run["decode_s"] for run in runs]
    prefill = [run["prefill_s"] for run in runs]
    return {
        "decode_s_median": statistics.median(decode),
        "decode_s_spread": max(decode) - min(decode),
        "decode_tokens_per_s_median": statistics.median(run["decode_tokens_per_s"] for run in runs),
        "inter_token_s_median": statistics.median(run["inter_token_s"] for run in runs),
        "prefill_s_median": statistics.median(prefill),
        "prefill_s_spread": max(prefill) - min(prefill),
        "prefill_tokens_per_s_median": statistics.median(run["prefill_tokens_per_s"] for run in runs),
    }


def decode_speed(models: dict, prompt, tokens: int, repeats: int) -> dict[str, float]:
    """Decode tokens/s of each model: the median over `repeats` interleaved runs of `tokens` decode steps."""
    timings = decode_timings(models, torch.as_tensor(prompt).reshape(1, -1), tokens, repeats, desc=None)
    return {name: timing_summary(runs)["decode_tokens_per_s_median"] for name, runs in timings.items()}
