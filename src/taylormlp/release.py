"""The release directory: what a model owner publishes and a user runs.

    DIR/config.json               base config + "taylormlp" section + auto_map for trust_remote_code
    DIR/model*.safetensors        weights (sharded above 2 GB, with model.safetensors.index.json)
    DIR/modeling_taylormlp.py     verbatim copy of taylormlp/runtime.py (stock transformers can load DIR)
    DIR/tokenizer*, generation_config.json
    DIR/README.md                 model card: coverage, order, fidelity, slowdown
    DIR/taylormlp_manifest.json   sha256 and size of every other file; written last

A release is written into a temporary directory beside DIR and renamed at the end, so an interrupted run
leaves no directory that ``load_release`` accepts.  Loading checks the manifest first and reads weights
only from safetensors (nothing is unpickled).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from . import runtime
from .errors import TaylorMLPError

MANIFEST = "taylormlp_manifest.json"
MODELING_FILE = "modeling_taylormlp.py"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_output_dir(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise TaylorMLPError(f"output directory {out} already exists; choose another --out or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise TaylorMLPError(f"output path {out} exists and is not a directory")


def save_release(model, out_dir, tokenizer=None, force: bool = False, card: str | None = None) -> Path:
    """Write the protected `model` (after `protect`) as a release directory, atomically."""
    out = Path(out_dir)
    spec = getattr(model.config, "taylormlp", None)
    if spec is None:
        raise TaylorMLPError("this model has not been protected: call taylormlp.protect(model, ...) first")
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        cls_name = runtime.release_class(model.config).__name__
        model.config.auto_map = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{cls_name}"}
        model.save_pretrained(tmp, max_shard_size="2GB")
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        shutil.copyfile(Path(runtime.__file__), tmp / MODELING_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card or model_card(spec))
        write_manifest(tmp)
        if out.exists():  # --force: swap the old directory out only once the new one is complete
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_manifest(directory: Path) -> None:
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(directory).as_posix()
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    (directory / MANIFEST).write_text(json.dumps({"format_version": runtime.FORMAT_VERSION, "files": files}, indent=1))


def verify_release(directory) -> dict:
    """Check DIR against its manifest; return the config.  Raises TaylorMLPError naming the problem."""
    d = Path(directory)
    if not d.is_dir():
        raise TaylorMLPError(f"release directory {d} does not exist")
    manifest_path = d / MANIFEST
    if not manifest_path.is_file():
        raise TaylorMLPError(f"{d} is not a complete taylormlp release: {MANIFEST} is missing "
                             f"(an interrupted `protect`? run it again)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise TaylorMLPError(f"{manifest_path} is corrupt: {exc}") from exc
    if manifest.get("format_version") != runtime.FORMAT_VERSION:
        raise TaylorMLPError(f"{manifest_path}: unknown format_version {manifest.get('format_version')!r}; "
                             f"this taylormlp reads version {runtime.FORMAT_VERSION} (upgrade taylormlp?)")
    for rel, info in files.items():
        path = d / rel
        if not path.is_file():
            raise TaylorMLPError(f"release file {rel} is missing from {d}")
        if path.stat().st_size != info["size"]:
            raise TaylorMLPError(f"release file {rel} has {path.stat().st_size} bytes, the manifest says {info['size']} "
                                 f"(truncated or modified)")
        if sha256_file(path) != info["sha256"]:
            raise TaylorMLPError(f"release file {rel} fails its sha256 check (tampered or corrupt)")
    if "config.json" not in files:
        raise TaylorMLPError(f"release {d} lists no config.json in its manifest")
    config = json.loads((d / "config.json").read_text())
    spec = config.get("taylormlp")
    if not isinstance(spec, dict):
        raise TaylorMLPError(f"{d / 'config.json'} has no 'taylormlp' section: not a taylormlp release")
    if spec.get("format_version") != runtime.FORMAT_VERSION:
        raise TaylorMLPError(f"{d / 'config.json'}: unknown taylormlp format_version {spec.get('format_version')!r}; "
                             f"this taylormlp reads version {runtime.FORMAT_VERSION}")
    return config


def load_release(directory, dtype: torch.dtype | None = None, verify: bool = True):
    """Load a release as a transformers causal LM whose layers' ``.mlp`` are TaylorMLP modules."""
    from transformers import AutoConfig

    d = Path(directory)
    if verify:
        verify_release(d)
    config = AutoConfig.from_pretrained(d)
    try:
        cls = runtime.release_class(config)
    except ValueError as exc:
        raise TaylorMLPError(str(exc)) from exc
    kwargs = {"use_safetensors": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = cls.from_pretrained(d, config=config, **kwargs)
    model.eval()
    return model


def release_size(directory) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def model_card(spec: dict, fidelity: dict | None = None, slowdown: dict | None = None) -> str:
    val = spec.get("validation") or {}
    lines = [
        "# TaylorMLP release",
        "",
        "This model's MLP blocks are released as series coefficients Θ₀..Θ_N (TaylorMLP, Wang et al., EMNLP 2024)",
        "instead of plain down-projection weights. Load it with `taylormlp.load_release(DIR)` or",
        "`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`.",
        "",
        "| field | value |",
        "| --- | --- |",
        f"| basis | {spec['basis']} |",
        f"| order N | {spec['order']} |",
        f"| preset | {spec.get('preset')} |",
        f"| coverage (protected share of MLP channels) | {spec['coverage']:.4f} |",
        f"| calibration tokens | {spec.get('calibration', {}).get('tokens')} |",
    ]
    if val:
        lines.append(f"| validation tokens matched | {val['tokens_matched']}/{val['tokens']} "
                     f"(max logit error {val['max_logit_error']:.4g}) |")
    if slowdown:
        lines.append(f"| measured decode slowdown | {slowdown['measured']:.2f}x (target {slowdown['target']}x, "
                     f"on the machine that ran protect) |")
    if fidelity:
        for key, value in fidelity.items():
            lines.append(f"| {key} | {value} |")
    lines += ["", "Security: TaylorMLP does not keep the MLP weights from a determined attacker; see the",
              "taylormlp README, section 'Security and limits', and run `taylormlp audit DIR`.", ""]
    return "\n".join(lines)
