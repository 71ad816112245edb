"""Slowdown as throughput at a batch size, measured on this machine: for `protect --slowdown X --serving-batch B`
(measure_ratios, on a Protector's candidate) and for `taylormlp bench --batch-sizes` (throughput_rows, on loaded
models).  Both time through decode.batch_timings / decode.interleaved: B copies of one prompt decoded together
(decode.batch_ids), the original and the release interleaved in one run.

The slowdown at batch B is decode time(release) / decode time(original) for the same B · tokens, which is the
ratio of the original's decode throughput (tokens/s over the batch) to the release's.  It grows with B on a CPU:
at batch 1 a step mostly streams weights from memory (the bytes ratio), at larger batches the multiply-adds and
the elementwise series work take over (towards the FLOPs ratio and beyond).  A server pays the large-batch figure.
"""

from __future__ import annotations

import statistics

import numpy as np
import torch

from ..common.choices import DIAL_STEPS, REPEATS
from ..common.hooks import swapped
from .decode import (batch_ids, batch_timings, interleaved, measure_decode, paired_ratios, phase_ratios,
                     phase_seconds)
from .generate import encode_prompt

MEASURE_PROMPT = "Explain in a few sentences why the sky is blue and why sunsets are red."
CURVE_BATCHES = (1, 8, 32)  # the batch sizes every --slowdown release records its measured slowdown at


def measure_prompt_ids(tokenizer, chat: bool) -> torch.Tensor:
    """The prompt protect times its candidates on, [1, L] (chat-templated when `chat`)."""
    return encode_prompt(tokenizer, MEASURE_PROMPT, chat)


def curve_batches(serving_batch: int) -> tuple[int, ...]:
    """The batch sizes of the recorded slowdown curve: CURVE_BATCHES and the serving batch, ascending."""
    return tuple(sorted({*CURVE_BATCHES, int(serving_batch)}))


# ---------------------------------------------------------------- protect: a candidate against the original


def timed_layers(theta_bytes: np.ndarray, budget: float | None) -> list[int]:
    """The layers whose candidate MLPs are timed: all of them when their Θ fits into `budget` bytes, else the most
    evenly spaced layers that do (at least one)."""
    n = len(theta_bytes)
    if budget is None or theta_bytes.sum() <= budget:
        return list(range(n))
    k = max(1, int(n * budget / theta_bytes.sum()))
    while True:
        layers = sorted({int(i) for i in np.linspace(0, n - 1, k).round()})
        if k == 1 or theta_bytes[layers].sum() <= budget:
            return layers
        k -= 1


def measure_ratios(protector, coverage: float, input_ids, batches=(1,), new_tokens: int = DIAL_STEPS, repeats: int = REPEATS,
                   budget: float | None = None, timer=None) -> tuple[dict, dict]:
    """Per batch size B: release time / original time in the same round, the median over interleaved runs
    (decode.interleaved; every batch size and both models in one run), on this machine.  `timer(model, B)` is one run:
    {"prefill_s", "decode_s"} (default: decode.measure_decode on decode.batch_ids(input_ids, B): B copies of one
    prompt, or a workload's first B prompts, then `new_tokens` decode steps), and B's value is then {phase: ratio}
    for common/choices.PHASES (prefill, decode, request); a timer that returns seconds gives one ratio per B.

    A candidate whose Θ does not fit into `budget` bytes is timed on evenly spaced layers only (the others keep
    their original MLP) and the extra time is scaled up by the extra work of all layers over that of the timed
    ones: ratio = 1 + (timed ratio − 1) · Σ_all extra MACs / Σ_timed extra MACs (time is a sum over layers).
    Returns ({B: ratio}, details: layers timed, and per B the ratio actually timed when it was scaled)."""
    if timer is None:
        def timer(model, batch):
            run = measure_decode(model, batch_ids(input_ids, batch), new_tokens)
            return {"prefill_s": run["prefill_s"], "decode_s": run["decode_s"]}

    sizes = list(dict.fromkeys(int(b) for b in batches))
    values, extra = protector.layer_work(coverage)
    layers = timed_layers(values * protector.dtype.itemsize, budget)
    taylor = protector.modules(coverage, materialize=True, only=set(layers))

    def release(batch):
        with swapped(protector.layers, taylor):
            return timer(protector.model, batch)
    runs = {}
    for b in sizes:
        runs[(b, "original")] = lambda b=b: timer(protector.model, b)
        runs[(b, "release")] = lambda b=b: release(b)
    with torch.no_grad():
        times = interleaved(runs, repeats)
    del taylor, release, runs
    timed = {b: _median_ratios(times[(b, "release")], times[(b, "original")]) for b in sizes}
    details = {"layers_timed": len(layers), "layers": len(values)}
    if len(layers) == len(values) or extra[layers].sum() == 0:
        return timed, details
    scale = float(extra.sum() / extra[layers].sum())
    return ({b: _scaled(r, scale) for b, r in timed.items()}, {**details, "timed_ratio": timed, "scale": scale})


def _median_ratios(mine: list, base: list):
    """The median of the paired ratios: per phase where the runs are dicts (decode.phase_ratios), else of the runs."""
    if isinstance(mine[0], dict):
        return {phase: statistics.median(r) for phase, r in phase_ratios(mine, base).items()}
    return statistics.median(paired_ratios(mine, base))


def _scaled(ratio, scale: float):
    """1 + (ratio − 1)·scale, per phase where `ratio` is a dict of them."""
    if isinstance(ratio, dict):
        return {phase: _scaled(r, scale) for phase, r in ratio.items()}
    return 1.0 + (ratio - 1.0) * scale


# ---------------------------------------------------------------- bench: loaded models


def throughput_rows(timings: dict[int, dict[str, list[dict]]], original: str, steps: int,
                    workload=None) -> list[dict]:
    """The one row builder of every timed table (bench --batch-sizes, bench --engine, a workload): per batch size and
    model, from runs in round order ({batch: {name: [{"prefill_s", "decode_s", ...}]}}, `steps` decode steps each),
    per phase of common/choices.PHASES its median seconds and its slowdown, the median of the paired (same-round) ratios to
    the original's, with their range; "slowdown" is the decode one.  Then tokens/s over the batch (B · steps / the
    median decode time), TTFT (the prefill to the first token) and the inter-token latency (one decode step: every
    sequence gets a token); with a `workload` (workload.Workload) its fields and the request's tokens/s."""
    rows = []
    for batch, runs in sorted(timings.items()):
        for name, mine in runs.items():
            row = {"batch": batch, "name": name, "kind": "original" if name == original else "release",
                   "new_tokens": steps}
            for phase, ratios in phase_ratios(mine, runs[original]).items():
                row.update({f"{phase}_s": statistics.median(phase_seconds(r, phase) for r in mine),
                            f"{phase}_slowdown": statistics.median(ratios), f"{phase}_slowdown_min": min(ratios),
                            f"{phase}_slowdown_max": max(ratios)})
            row.update({"slowdown": row["decode_slowdown"], "slowdown_min": row["decode_slowdown_min"],
                        "slowdown_max": row["decode_slowdown_max"], "decode_s_median": row["decode_s"],
                        "decode_tokens_per_s": batch * steps / row["decode_s"], "ttft_ms": row["prefill_s"] * 1e3,
                        "inter_token_ms": row["decode_s"] / steps * 1e3, "runs": mine})
            if workload is not None:
                row.update(workload.as_dict(), request_tokens_per_s=batch * workload.new_tokens / row["request_s"])
            rows.append(row)
    return rows


def bench_timings(models: dict, input_ids, tokens: int, repeats: int, batch_sizes) -> dict:
    """decode.batch_timings for bench: batch 1 is always among them (the latency table is its run)."""
    return batch_timings(models, input_ids, tokens, repeats, sorted({1, *(int(b) for b in batch_sizes)}))
