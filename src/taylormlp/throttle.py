"""`--slowdown X`: choose the series order N so that decoding is X times slower than the original.

The throttle is the series itself: every order adds one [d × Q] block to Θ (Q series pieces), so decode cost
grows linearly in N.  The pieces are decided once at the preset's base order and kept while N grows.  We calibrate once, choose coverage at the preset's base order, then measure decode latency of the
original and of the release at a few orders on this machine, interleaved (original, release, original, …)
so that machine noise hits both alike, and solve the measured line ratio(N) for the target.
"""

from __future__ import annotations

import statistics

import numpy as np
import torch

from . import series
from .convert import Protector, ProtectOptions, calibrate, finish, search_coverage, validate
from .calibration import format_prompt
from .errors import TaylorMLPError
from .progress import log

MEASURE_PROMPT = "Explain in a few sentences why the sky is blue and why sunsets are red."


def _prompt_ids(tokenizer, chat: bool) -> torch.Tensor:
    text = format_prompt(tokenizer, MEASURE_PROMPT, chat)
    return tokenizer(text, return_tensors="pt").input_ids


def measure_ratio(protector: Protector, coverage: float, input_ids, new_tokens: int = 24, repeats: int = 3) -> float:
    """Median over interleaved runs of decode time(release at current order) / decode time(original)."""
    from .bench import measure_decode

    protector.apply(coverage)
    taylor = [layer.mlp for layer in protector.layers]
    ratios = []
    with torch.no_grad():
        for rep in range(repeats + 1):  # the first round is a warm-up
            protector.restore()
            t_orig = measure_decode(protector.model, input_ids, new_tokens)["decode_s"]
            for layer, mlp in zip(protector.layers, taylor):
                layer.mlp = mlp
            t_prot = measure_decode(protector.model, input_ids, new_tokens)["decode_s"]
            if rep:
                ratios.append(t_prot / t_orig)
    return statistics.median(ratios)


def protect_for_slowdown(model, tokenizer, texts, opts: ProtectOptions, chat: bool, target: float):
    """Protect `model` in place at the order whose measured decode slowdown is closest to `target`."""
    base = opts.resolved()
    data, ranges = calibrate(model, tokenizer, texts, base, chat)
    ids = _prompt_ids(tokenizer, chat)
    protector = Protector(model, ranges, base)
    search: list = []
    coverage = base.coverage if base.coverage is not None else search_coverage(protector, data, search)
    if coverage <= 0.0:
        raise TaylorMLPError("no channel can be protected token-exactly, so no slowdown is possible; "
                             "try the default preset or more calibration text")
    trials = {}

    def at(order: int) -> float:
        order = int(np.clip(order, 1, series.MAX_ORDER))
        if order not in trials:
            nonlocal protector
            protector.restore()
            protector = Protector(model, ranges, ProtectOptions(**{**base.__dict__, "order": order,
                                                                         "piece_order": base.order}).resolved())
            trials[order] = measure_ratio(protector, coverage, ids)
            log(f"order {order}: measured decode slowdown {trials[order]:.2f}x")
        return trials[order]

    lo_order = base.order
    r_lo = at(lo_order)
    if r_lo > 1.15 * target:
        log(f"already {r_lo:.2f}x at the base order {lo_order} (more than the {target}x asked for): lower orders "
            f"on the same pieces lose accuracy; for a small slowdown use --max-pieces 1 or --preset paper")
    hi_order = max(lo_order + 8, int(round(lo_order * max(target, 2.0))))
    r_hi = at(hi_order)
    for _ in range(3):  # secant steps on the (close to linear) ratio(N) line
        slope = (r_hi - r_lo) / max(hi_order - lo_order, 1)
        if slope <= 0:
            break
        guess = int(round(lo_order + (target - r_lo) / slope))
        guess = int(np.clip(guess, 1, series.MAX_ORDER))
        if guess in trials:
            break
        r_guess = at(guess)
        lo_order, r_lo, hi_order, r_hi = (guess, r_guess, hi_order, r_hi) if r_guess < target else \
            (lo_order, r_lo, guess, r_guess)
    best = min(trials, key=lambda n: abs(trials[n] - target))
    protector.restore()
    final = ProtectOptions(**{**base.__dict__, "order": best, "piece_order": base.order}).resolved()
    protector = Protector(model, ranges, final)
    protector.apply(coverage)
    result = validate(model, data.validation) if data.validation else {"exact": True}
    if not result["exact"]:  # a higher order changed the approximation: re-search coverage at this order
        log(f"order {best} is not token-exact at coverage {coverage:.3f}; searching coverage again")
        protector.restore()
        coverage = search_coverage(protector, data, search)
    spec = finish(protector, coverage, data, ranges, search)
    measured = measure_ratio(protector, coverage, ids)
    protector.apply(coverage)
    spec["slowdown"] = {"target": target, "measured": measured, "trials": {str(k): v for k, v in sorted(trials.items())}}
    model.config.taylormlp = spec
    return spec, spec["slowdown"]
