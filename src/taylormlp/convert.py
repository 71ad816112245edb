"""protect(): turn a transformers causal LM's MLPs into TaylorMLP modules, in place.

The flow of a run (AutoAWQ-style steps; the CLI's streamed variant is pipeline.protect_to_release):

1. calibrate (calibration.calibrate): per-channel ranges of every MLP's pre-activation, and the original's
   greedy continuations on held-out prompts as the validation set;
2. plan (protector.Protector): per layer, series pieces and their coefficients (pieces.py, series.py), the
   channel ranking and the ±1 signs, from one layer's weights at a time;
3. choose the coverage (search.search_coverage): the largest that stays token-exact on validation;
4. finish: validate that coverage, build the release spec, install the TaylorMLP modules.
"""

from __future__ import annotations

import numpy as np

from . import runtime
from .calibration import CalibrationData, Ranges, calibrate
from .decode import validate
from .errors import TaylorMLPError
from .options import ProtectOptions
from .protector import Protector
from .search import search_coverage


def build_spec(protector: Protector, masks: list[np.ndarray], opts: ProtectOptions, record: dict) -> dict:
    """The release spec (runtime.ReleaseSpec, as the dict config.json holds) of `masks`; `record` is what the run
    measured (calibration, validation, coverage search, seed, ...)."""
    layers = []
    for plan, mask in zip(protector.plans, masks):
        P = int(mask.sum())
        Q = int(np.isin(plan.pieces.owner, np.flatnonzero(mask)).sum())
        layers.append(runtime.LayerShape(protected=P, rest=int(mask.size - P), pieces=Q,
                                         rest_out_bias=bool(plan.has_c and P == 0)))
    total = sum(m.size for m in masks)
    return runtime.ReleaseSpec(
        family=protector.arch["family"], hidden_size=int(protector.plans[0].hidden), activation=protector.act,
        order=int(opts.order), basis=opts.basis, coverage=float(sum(int(m.sum()) for m in masks) / total),
        layers=layers, rest_bias=bool(protector.plans[0].has_b), preset=opts.preset, selection=opts.selection,
        margin=float(opts.margin), max_pieces=int(opts.max_pieces), record=record).to_dict()


def protect(model, tokenizer=None, calibration: list[str] | Ranges | None = None, options: ProtectOptions | None = None,
            chat: bool | None = None, prepared: tuple[CalibrationData, Ranges] | None = None, **kwargs) -> dict:
    """Replace every MLP of `model` by a TaylorMLP in place and return the release spec (also set on
    ``model.config.taylormlp``).  `calibration` is a list of texts (default: the built-in corpus) or ready
    Ranges (then no validation is possible and `coverage` must be given); `prepared` reuses `calibrate()`."""
    opts = (options or ProtectOptions(**kwargs)).resolved()
    try:
        runtime.architecture(model.config)
    except ValueError as exc:
        raise TaylorMLPError(str(exc)) from exc
    model.eval()
    data, ranges = _calibration(model, tokenizer, calibration, opts, chat, prepared)
    protector = Protector(model, ranges, opts)
    return finish(protector, choose_coverage(protector, data), data, ranges)


def _calibration(model, tokenizer, calibration, opts, chat, prepared):
    if prepared is not None:
        return prepared
    if isinstance(calibration, Ranges):
        if opts.coverage is None:
            raise TaylorMLPError("with precomputed ranges there is no validation data: give coverage explicitly")
        return None, calibration
    return calibrate(model, tokenizer, calibration, opts, chat)


def choose_coverage(protector: "Protector", data: CalibrationData | None) -> tuple[float, list]:
    search: list = []
    opts = protector.opts
    coverage = opts.coverage if opts.coverage is not None else search_coverage(protector, data, search)
    return coverage, search


def finish(protector: Protector, chosen: tuple[float, list] | float, data: CalibrationData | None, ranges: Ranges,
           search: list | None = None, materialize: bool | None = None, install: bool = True) -> dict:
    """The release spec of `coverage`: its validation (the search's run of this very coverage, or a new one with
    the candidate installed only while it runs) and its layer shapes.  install=True puts the TaylorMLP modules
    into the model for good and records the spec on its config (protect's result); install=False leaves the model
    as it was (a streamed run writes the release layer by layer from protector.build)."""
    coverage, search = chosen if isinstance(chosen, tuple) else (chosen, search or [])
    opts, model = protector.opts, protector.model
    masks = protector.masks(coverage)
    extra = {"calibration": ranges.summary(), "seed": opts.seed}
    if data is not None and data.validation:
        done = [row for row in search if row["coverage"] == coverage and "stopped_after" not in row
                and not row.get("screen")]
        if done:
            extra["validation"] = {k: v for k, v in done[-1].items() if k not in ("coverage", "accepted", "screen")}
        else:
            with protector.installed(coverage, materialize):
                extra["validation"] = validate(model, data.validation, opts.batch_tokens)
    extra["coverage_search"] = search
    spec = build_spec(protector, masks, opts, extra)
    if install:
        protector.apply(coverage)
        model.config.taylormlp = spec
    return spec
