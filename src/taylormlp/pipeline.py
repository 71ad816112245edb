"""End-to-end flows behind the CLI: protect a SOURCE into a release, load anything, generate, inspect."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import torch

from . import preflight
from .calibration import calibrate, format_prompt
from .card import base_model, model_card
from .convert import choose_coverage, finish
from .errors import TaylorMLPError
from .kinds import MANIFEST
from .leakcheck import leak_check
from .options import ProtectOptions
from .paths import write_text_atomically
from .progress import log
from .protector import Protector
from .runtime import ReleaseSpec
from .release import (DTYPES, ModelTensors, check_output_dir, load_release, release_size, save_release,
                      save_streamed_release, verify_release)
from .sources import is_chat_model, load_base, load_tokenizer, resolve_source
from .stream import SourceMLPs, open_streamed, resolve_device
from .throttle import protect_for_slowdown


def read_calibration_file(path: Path) -> list[str]:
    if path.is_dir():
        raise TaylorMLPError(f"--calibration {path} is a directory; give a UTF-8 text file (paragraphs separated by "
                             f"blank lines)")
    if not path.is_file():
        raise TaylorMLPError(f"--calibration {path}: calibration file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TaylorMLPError(f"calibration file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); give a "
                             f"UTF-8 text file (paragraphs separated by blank lines)") from exc
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not paragraphs:
        raise TaylorMLPError(f"calibration file {path} is empty; give real text")
    return paragraphs


def protect_to_release(source, out, *, preset="default", order=None, basis=None, coverage=None, slowdown=None,
                       calibration_file=None, dtype="float32", seed=0, chat=None, force=False, device="auto",
                       serving_batch=None, dry_run=False, engine="taylormlp", engine_dtype="auto", **tuning) -> dict:
    """Protect SOURCE into the release directory OUT.  `tuning` passes extra ProtectOptions fields
    (calibration_samples, continuation_tokens, prose_chars, search_steps, margin, ...).

    The model is streamed (stream.open_streamed): embeddings, norms and head stay resident, every decoder layer is
    read from the source's safetensors when it runs, the coverage search builds each layer's candidate TaylorMLP
    when that layer runs, and the release is written one layer per shard.  Peak memory is one layer plus the
    calibration activations, whatever the depth.  `--slowdown` measures decode latency, which needs the model
    in memory: that path loads it whole; `serving_batch` (with `slowdown` only; default 1) is the batch size at
    which the slowdown is met (throttle.protect_for_slowdown); engine="vllm" (with `slowdown` only) measures it on
    vLLM in `engine_dtype` instead of our own runtime (vllm_dial.EngineDial).

    Before any of it, the pre-flight (preflight.estimate, from the config and safetensors headers) is logged and a
    run whose release or peak memory cannot fit is refused; dry_run=True returns {"estimate": it} there instead."""
    if serving_batch is not None and slowdown is None:
        raise TaylorMLPError(f"--serving-batch {serving_batch} needs --slowdown X: it sets the batch size at which the "
                             f"slowdown is met; add --slowdown or drop --serving-batch")
    if engine != "taylormlp" and slowdown is None:
        raise TaylorMLPError(f"--engine {engine} needs --slowdown X: it sets the engine the slowdown is measured on; "
                             f"add --slowdown or drop --engine")
    if engine_dtype != "auto" and engine != "vllm":
        raise TaylorMLPError(f"--engine-dtype {engine_dtype} is for --engine vllm; the release's dtype is --dtype")
    if engine == "vllm":
        from .vllm_engine import require_vllm

        require_vllm()  # before minutes of calibration: `make vllm-setup`
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
    if slowdown is not None:
        model, tokenizer, _ = load_base(model_dir, dtype=DTYPES[dtype])
        chat = is_chat_model(tokenizer) if chat is None else chat
        measure = None
        if engine == "vllm":
            from .throughput import measure_prompt_ids
            from .vllm_dial import EngineDial

            prompt = measure_prompt_ids(tokenizer, chat)[0].tolist()
            measure = EngineDial(model_dir, tokenizer, prompt, dtype=engine_dtype)
        try:
            spec, slow, protector = protect_for_slowdown(model, tokenizer, texts, opts, chat, slowdown, measure=measure,
                                                         serving_batch=1 if serving_batch is None else serving_batch)
        finally:
            if measure is not None:
                measure.close()
        card = model_card(spec, slowdown=slow, base=base_model(source))
        if slow["held_in_memory"]:
            save_release(model, out, tokenizer, force=force, card=card)
        else:  # too big to hold: the model stayed the original; each layer's TaylorMLP is built as it is written
            write_release(out, protector, spec, ModelTensors(model), DTYPES[dtype], tokenizer, force=force, card=card,
                          generation_config=model.generation_config)
        return {"out": str(out), "coverage": spec["coverage"], "order": spec["order"], "basis": spec["basis"],
                "size_bytes": release_size(out), "slowdown": slow}
    tokenizer = load_tokenizer(model_dir)
    chat = is_chat_model(tokenizer) if chat is None else chat
    with tempfile.TemporaryDirectory(prefix="taylormlp-offload-") as offload:
        model, weights = open_streamed(model_dir, DTYPES[dtype], device, offload)
        data, ranges = calibrate(model, tokenizer, texts, opts, chat)
        protector = Protector(model, ranges, opts, mlps=SourceMLPs(weights, model.config), streamed=True)
        spec = finish(protector, choose_coverage(protector, data), data, ranges, materialize=False, install=False)
        card = model_card(spec, base=base_model(source))
        write_release(out, protector, spec, weights, DTYPES[dtype], tokenizer, force=force, card=card, model_dir=model_dir)
    return {"out": str(out), "coverage": spec["coverage"], "order": spec["order"], "basis": spec["basis"],
            "size_bytes": release_size(out), "slowdown": None}


def write_release(out, protector: Protector, spec: dict, tensors, dtype, tokenizer, **kwargs):
    """Write the release of `spec` layer by layer: the model's other tensors from `tensors` (a streamed source or
    release.ModelTensors), each layer's TaylorMLP built by `protector` as it is written (the model itself is left
    as it is)."""
    masks = protector.masks(spec["coverage"])
    config = copy.deepcopy(protector.model.config)
    config.taylormlp = spec
    return save_streamed_release(out, config, tensors, lambda i: protector.build(i, masks[i]), dtype, tokenizer,
                                 **kwargs)


def load_any(path, base: bool = False):
    """(model, tokenizer) for a release directory, or for a base model SOURCE when base=True."""
    if base:
        model, tokenizer, _ = load_base(path)
        return model, tokenizer
    model = load_release(path)
    try:
        tokenizer = load_tokenizer(Path(path))
    except TaylorMLPError as exc:
        raise TaylorMLPError(f"release {path} carries no usable tokenizer ({exc}); write releases with their "
                             f"tokenizer (save_release(model, DIR, tokenizer))") from exc
    return model, tokenizer


def context_length(config) -> int | None:
    """The longest sequence the model's position scheme was built for (max_position_embeddings, n_positions, ...)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_prompt(prompt, where: str = "the prompt") -> str:
    """A prompt is text: a str that encodes as UTF-8 (no undecodable bytes) and holds no NUL characters."""
    if not isinstance(prompt, str):
        raise TaylorMLPError(f"{where} must be text, got {type(prompt).__name__} {str(prompt)[:40]!r}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TaylorMLPError(f"{where} is not text: it holds bytes that are not UTF-8 (at character {exc.start}); "
                             f"give UTF-8 text") from exc
    if "\x00" in prompt:
        raise TaylorMLPError(f"{where} is not text: it holds a NUL character (at character {prompt.index(chr(0))}); "
                             f"give plain text")
    return prompt


@torch.no_grad()
def generate_ids(model, tokenizer, prompt: str, chat: bool, max_new_tokens: int) -> tuple[torch.Tensor, int]:
    """Greedy continuation of `prompt` (new token ids, prompt length).  An empty prompt starts from the BOS token; a
    prompt that, with `max_new_tokens`, runs past the model's context is refused."""
    check_prompt(prompt)
    if chat and not is_chat_model(tokenizer):
        raise TaylorMLPError("--chat given, but this model's tokenizer has no chat template; drop --chat to use the "
                             "prompt as plain text")
    text = format_prompt(tokenizer, prompt, chat)
    add_special = not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=add_special).input_ids
    if ids.shape[1] == 0:  # an empty prompt (the tokenizer adds no BOS by itself): start from BOS
        bos = tokenizer.bos_token_id
        if bos is None:
            bos = getattr(model.generation_config, "bos_token_id", None) if model.generation_config else None
        if bos is None:
            bos = getattr(model.config, "bos_token_id", None)
        if isinstance(bos, (list, tuple)):
            bos = bos[0] if bos else None
        if bos is None:
            raise TaylorMLPError("the prompt is empty and this model has no BOS token to start from; give a prompt")
        ids = torch.tensor([[int(bos)]], dtype=torch.long)
    limit = context_length(model.config)
    if limit is not None and ids.shape[1] + max_new_tokens > limit:
        if ids.shape[1] >= limit:
            raise TaylorMLPError(f"the prompt is {ids.shape[1]} tokens, longer than the model's context of {limit} "
                                 f"tokens (max_position_embeddings); shorten the prompt")
        raise TaylorMLPError(f"the prompt is {ids.shape[1]} tokens; with --max-new-tokens {max_new_tokens} that runs "
                             f"past the model's context of {limit} tokens (max_position_embeddings); shorten the prompt "
                             f"or use --max-new-tokens {limit - ids.shape[1]} or less")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad)
    return out[0, ids.shape[1]:], ids.shape[1]


def generate_text(model, tokenizer, prompt: str, chat: bool = False, max_new_tokens: int = 64) -> tuple[str, int]:
    new, _ = generate_ids(model, tokenizer, prompt, chat, max_new_tokens)
    return tokenizer.decode(new, skip_special_tokens=True), int(new.numel())


def inspect_release(directory, leak_source=None) -> dict:
    config = verify_release(directory)  # every file's size and sha256 against the manifest
    spec = ReleaseSpec.from_dict(config["taylormlp"])
    manifest = json.loads((Path(directory) / MANIFEST).read_text(encoding="utf-8"))
    info = {
        "manifest": {"verified": True, "files": len(manifest["files"])},
        "format_version": spec.format_version,
        "architecture": config.get("model_type"),
        "family": spec.family,
        "activation": spec.activation,
        "basis": spec.basis,
        "order": spec.order,
        "preset": spec.preset,
        "coverage": spec.coverage,
        "pieces_per_protected_channel": _pieces_ratio(spec),
        "layers": [{"layer": i, **row} for i, row in enumerate(spec.to_dict()["layers"])],
        "size_bytes": release_size(directory),
        "calibration": spec.record.get("calibration"),
        "validation": spec.record.get("validation"),
    }
    if leak_source is not None:
        info["leak_check"] = leak_check(directory, leak_source)
    return info


def _pieces_ratio(spec: ReleaseSpec) -> float | None:
    P = sum(shape.protected for shape in spec.layers)
    Q = sum(shape.protected if shape.pieces is None else shape.pieces for shape in spec.layers)
    return Q / P if P else None


def dump_json(obj, path: Path, flag: str = "--json") -> None:
    """Write `obj` as JSON to `path` atomically; a path that cannot be written is a TaylorMLPError naming it."""
    write_text_atomically(Path(path), json.dumps(obj, indent=1), flag)
    log(f"wrote {path}")
