"""The protect flow, once, for every caller: the in-memory API (`protect`), the CLI's `protect` (`protect_to_release`,
streamed layer by layer or, for --slowdown, whole) and the slowdown dial all run `run`'s four steps:

1. calibrate (calibration.calibrate): per-channel ranges of every MLP's pre-activation, and the original's greedy
   continuations on held-out prompts as the validation set;
2. plan (protector.Protector): per layer, series pieces and their coefficients (maths/pieces.py, maths/series.py),
   the channel ranking and the ±1 signs, from one layer's weights at a time — the one per-layer loop;
3. choose the setting: the largest token-exact coverage (search.choose_coverage), or the series order, pieces and
   coverage whose measured slowdown meets --slowdown (throttle.choose_slowdown, which plans its candidates with
   step 2's Protector);
4. finish: the chosen setting's validation record and its release spec (runtime.ReleaseSpec, typed until it is
   written: installed on a model's config, or written with the release).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .. import runtime
from ..common.choices import DEFAULT_ENGINE, ROUNDS
from ..common.errors import TaylorMLPError
from ..common.machine import resolve_device
from ..common.progress import log
from ..measure import engines
from ..measure.decode import validate
from ..measure.throughput import measure_prompt_ids
from ..measure.workload import Workload
from ..release.card import base_model, model_card
from ..release.directory import DTYPES, ModelTensors, check_output_dir, release_size
from ..release.sources import is_chat_model, load_base, load_tokenizer, resolve_source
from ..release.stream import SourceMLPs, open_streamed
from . import preflight
from .calibration import CalibrationData, Ranges, calibrate, read_calibration_file
from .options import ProtectOptions
from .protector import Protector
from .search import Setting, choose_coverage
from .engine_dial import EngineDial
from .throttle import choose_slowdown


def run(model, tokenizer, texts, opts: ProtectOptions, chat: bool, *, prepared=None, mlps=None,
        streamed: bool = False, slowdown: float | None = None, serving_batch: int = 1, measure=None,
        rounds: int = ROUNDS, workload: Workload | None = None):
    """Steps 1-4 on `model` (left as it is): (ReleaseSpec, Setting).  `prepared` = (CalibrationData, Ranges) skips
    step 1; `mlps`/`streamed` read the MLP weights from a streamed source (stream.SourceMLPs); `slowdown` chooses
    the setting by measured decode slowdown at `serving_batch` (with a `workload`: whole-request slowdown on it), at
    most `rounds` settings measured (`measure` injects the timing, as tests do)."""
    data, ranges = prepared if prepared is not None else calibrate(model, tokenizer, texts, opts, chat)
    if slowdown is None:
        setting = choose_coverage(Protector(model, ranges, opts, mlps=mlps, streamed=streamed), data)
    else:
        setting = choose_slowdown(model, tokenizer, chat, (data, ranges), opts, slowdown, measure=measure,
                                  rounds=rounds, serving_batch=serving_batch, workload=workload)
    return finish(setting, data, ranges), setting


def finish(setting: Setting, data: CalibrationData | None, ranges: Ranges) -> runtime.ReleaseSpec:
    """Step 4: the release spec of `setting`, with its validation (the search's run of this very coverage, or a new
    one with the candidate installed only while it runs) and what was recorded on the way."""
    protector, coverage = setting.protector, setting.coverage
    opts = protector.opts
    record = {"calibration": ranges.summary(), "seed": opts.seed}
    if data is not None and data.validation:
        done = [row for row in setting.trace if row["coverage"] == coverage and "stopped_after" not in row
                and not row.get("screen")]
        if done:
            record["validation"] = {k: v for k, v in done[-1].items() if k not in ("coverage", "accepted", "screen")}
        else:
            with protector.installed(coverage, setting.held):
                record["validation"] = validate(protector.model, data.validation, opts.batch_tokens)
    record["coverage_search"] = setting.trace
    if setting.slowdown is not None:
        record["slowdown"] = setting.slowdown.to_dict()
    return protector.release_spec(coverage, record)


def install(model, setting: Setting, spec: runtime.ReleaseSpec) -> dict:
    """Put the setting's TaylorMLP modules into `model` for good; the spec, as config.json holds it, goes on its
    config and is returned."""
    setting.protector.apply(setting.coverage)
    model.config.taylormlp = spec.to_dict()
    return model.config.taylormlp


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
    if prepared is None and isinstance(calibration, Ranges):
        if opts.coverage is None:
            raise TaylorMLPError("with precomputed ranges there is no validation data: give coverage explicitly")
        prepared = (None, calibration)
    spec, setting = run(model, tokenizer, calibration, opts, chat, prepared=prepared)
    return install(model, setting, spec)


def protect_to_release(source, out, *, preset="default", order=None, basis=None, coverage=None, slowdown=None,
                       calibration_file=None, dtype="float32", seed=0, chat=None, force=False, device="auto",
                       serving_batch=None, dry_run=False, engine=DEFAULT_ENGINE["protect"], engine_dtype="auto",
                       rounds=None, workload: str | None = None, **tuning) -> dict:
    """Protect SOURCE into the release directory OUT.  `tuning` passes extra ProtectOptions fields
    (calibration_samples, continuation_tokens, prose_chars, search_steps, margin, ...).

    The model is streamed (stream.open_streamed): embeddings, norms and head stay resident, every decoder layer is
    read from the source's safetensors when it runs, the coverage search builds each layer's candidate TaylorMLP
    when that layer runs, and the release is written one layer per shard.  Peak memory is one layer plus the
    calibration activations, whatever the depth.  `--slowdown` measures decode latency, which needs the model
    in memory: that path loads it whole; `serving_batch` (with `slowdown` only; default 1) is the batch size at
    which the slowdown is met (throttle.choose_slowdown); `engine` (with `slowdown` only) names the engine it is
    measured on (measure/engines.get: our own runtime in this process, or e.g. "vllm" in `engine_dtype`, through
    engine_dial.EngineDial); `rounds` (with `slowdown` only) caps the
    settings measured (default common/choices.ROUNDS); `workload` "P:G" (with `slowdown` only) dials whole-request
    throughput on B distinct prompts of P tokens, G generated tokens each, instead of decode throughput.

    Before any of it, the pre-flight (preflight.estimate, from the config and safetensors headers) is logged and a
    run whose release or peak memory cannot fit is refused; dry_run=True returns {"estimate": it} there instead."""
    for flag, value, what in (("--serving-batch", serving_batch, "sets the batch size at which the slowdown is met"),
                              ("--engine", None if engine == DEFAULT_ENGINE["protect"] else engine,
                               "sets the engine the slowdown is measured on"),
                              ("--rounds", rounds, "caps the settings the slowdown dial measures"),
                              ("--workload", workload, "sets the requests the slowdown is met on")):
        if value is not None and slowdown is None:
            raise TaylorMLPError(f"{flag} {value} needs --slowdown X: it {what}; add --slowdown or drop {flag}")
    workload = Workload.parse(workload) if workload is not None else None
    runner = engines.get(engine, "protect")
    if engine_dtype != "auto" and runner.in_process:
        raise TaylorMLPError(f"--engine-dtype {engine_dtype} is for an engine that runs the release elsewhere (e.g. "
                             f"--engine vllm); the release's dtype is --dtype")
    runner.require()  # before minutes of calibration (vLLM: `make vllm-setup`)
    out = Path(out)
    check_output_dir(out, force)  # fail before minutes of work, not after
    if dtype not in DTYPES:
        raise TaylorMLPError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    device = resolve_device(device)
    texts = read_calibration_file(Path(calibration_file)) if calibration_file else None
    opts = ProtectOptions(preset=preset, order=order, basis=basis, coverage=coverage, seed=seed, **tuning).resolved()
    model_dir = resolve_source(source)
    # reads config.json and the safetensors headers (a broken one is named before anything else reads it)
    estimate = preflight.estimate(model_dir, opts, dtype, out, device, whole=slowdown is not None)
    if dry_run:
        return {"estimate": estimate}
    for line in estimate.table():
        log(line)
    preflight.check(estimate)  # before calibration: a release that cannot fit is refused now, not at the end
    with tempfile.TemporaryDirectory(prefix="taylormlp-offload-") as offload:
        if slowdown is None:  # streamed: one decoder layer in memory at a time
            tokenizer = load_tokenizer(model_dir)
            model, tensors = open_streamed(model_dir, DTYPES[dtype], device, offload)
            mlps = SourceMLPs(tensors, model.config)
        else:  # decode timing needs the model whole
            model, tokenizer, _ = load_base(model_dir, dtype=DTYPES[dtype])
            tensors, mlps = ModelTensors(model), None
        chat = is_chat_model(tokenizer) if chat is None else chat
        measure = None
        if not runner.in_process:
            measure = EngineDial(runner, model_dir, tokenizer, measure_prompt_ids(tokenizer, chat)[0].tolist(),
                                 engine_dtype, workload=workload)
        try:
            spec, setting = run(model, tokenizer, texts, opts, chat, mlps=mlps, streamed=mlps is not None,
                                slowdown=slowdown, serving_batch=1 if serving_batch is None else serving_batch,
                                measure=measure, rounds=ROUNDS if rounds is None else rounds, workload=workload)
        finally:
            if measure is not None:
                measure.close()
        card = model_card(spec.to_dict(), slowdown=setting.slowdown, base=base_model(source))
        # each layer's TaylorMLP is built as it is written; the model itself stays the original
        origin = {"model_dir": model_dir} if mlps is not None else {"generation_config": model.generation_config}
        setting.protector.write_release(out, spec, tensors, DTYPES[dtype], tokenizer, force=force, card=card, **origin)
    return {"out": str(out), "coverage": spec.coverage, "order": spec.order, "basis": spec.basis,
            "size_bytes": release_size(out), "slowdown": setting.slowdown}
