"""The release directory: what a model owner publishes and a user runs.

    DIR/config.json               base config, activation masked (runtime.LOAD_NOTICE) + "taylormlp" section +
                                  auto_map (AutoModel, AutoModelForCausalLM) for trust_remote_code
    DIR/model*.safetensors        weights (sharded above 2 GB, with model.safetensors.index.json)
    DIR/modeling_taylormlp.py     verbatim copy of taylormlp/runtime.py (stock transformers can load DIR)
    DIR/series_module.py          verbatim copy of taylormlp/series_module.py (the TaylorMLP module it imports)
    DIR/tokenizer*, generation_config.json
    DIR/README.md                 model card (card.py): coverage, order, fidelity, slowdown, base model
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

from .. import runtime, series_module
from ..common.choices import DTYPE_NAMES
from ..common.errors import TaylorMLPError, first_line
from ..common.files import read_json
from ..common.machine import release_memory
from ..common.paths import check_creatable
from ..common.progress import bar
from .card import base_model, model_card
from .kinds import MANIFEST, is_release, refuse_non_release, temporary_prefix

MODELING_FILE = "modeling_taylormlp.py"
RUNTIME_FILES = {MODELING_FILE: Path(runtime.__file__),  # what a release carries of the package, verbatim
                 "series_module.py": Path(series_module.__file__)}
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # the names are choices.py's (the CLI's --dtype)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_output_dir(out: Path, force: bool) -> None:
    """Fail now, before any work, if the release directory `out` could not be written: it is a file, it exists
    (without force), it is a directory other than an earlier release or an empty one (even with force), or it lies
    under a file or in a directory where nothing can be created."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TaylorMLPError(f"output path {out} exists and is not a directory; choose another --out")
    if out.exists() and not force:
        raise TaylorMLPError(f"output directory {out} already exists; choose another --out or pass --force to replace it")
    if out.exists() and not is_release(out) and any(out.iterdir()):  # --force never deletes what we did not write
        raise TaylorMLPError(f"--out {out} holds files that are not a taylormlp release; --force replaces only an "
                             f"earlier release or an empty directory: choose another --out")
    # the release is written into a temporary directory beside `out`, so `out`'s directory must take new entries
    check_creatable(out if not out.exists() else out.parent / f".{out.name}.new", "--out")


def save_release(model, out_dir, tokenizer=None, force: bool = False, card: str | None = None) -> Path:
    """Write the protected `model` (after `protect`) as a release directory, atomically, in the same layout as
    the streamed writer (one shard per decoder layer)."""
    out = Path(out_dir)
    spec = getattr(model.config, "taylormlp", None)
    if spec is None:
        raise TaylorMLPError("this model has not been protected: call taylormlp.protect(model, ...) first")
    layers = runtime.decoder_layers(model)
    if not all(isinstance(layer.mlp, runtime.TaylorMLP) for layer in layers):
        raise TaylorMLPError("this model's MLPs are not all TaylorMLP modules: save_release writes a model after "
                             "taylormlp.protect(model, ...) has installed them")
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return save_streamed_release(out, model.config, ModelTensors(model), lambda i: layers[i].mlp, dtype, tokenizer,
                                 force=force, card=card or model_card(spec, base=base_model(model_source(model))),
                                 generation_config=model.generation_config)


def model_source(model) -> str | None:
    """Where a model in memory was loaded from (transformers records the path or name given to from_pretrained)."""
    return getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None) or None


class ModelTensors:
    """The tensors of a model held in memory, with the reading interface of stream.SafetensorsSource (a tensor
    tied to another one, like a tied output embedding, is listed once: transformers ties it again on load)."""

    def __init__(self, model):
        self.tensors: dict[str, torch.Tensor] = {}
        seen = set()
        for name, t in model.state_dict().items():
            key = (t.data_ptr(), t.numel(), tuple(t.shape))
            if t.numel() and key in seen:
                continue
            seen.add(key)
            self.tensors[name] = t

    def names(self) -> list[str]:
        return list(self.tensors)

    def read(self, names, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            t = self.tensors[name].detach().to("cpu")
            out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out


def save_streamed_release(out_dir, config, source, build_mlp, dtype: torch.dtype, tokenizer=None, force: bool = False,
                          card: str | None = None, model_dir=None, generation_config=None) -> Path:
    """Write a release layer by layer, never holding more than one layer: every tensor of `source` (a
    stream.SafetensorsSource) but the decoder layers' MLPs is copied (cast to `dtype`), and layer i's MLP is
    `build_mlp(i)` (a TaylorMLP).  One safetensors shard per decoder layer plus one for the rest, with the standard
    index, so transformers (and accelerate's offloading) load it like any sharded checkpoint."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    spec = getattr(config, "taylormlp", None)
    if spec is None:
        raise TaylorMLPError("config has no taylormlp section: nothing was protected")
    prefix = runtime.architecture(config)["layers"] + "."
    n_layers = len(spec["layers"])
    groups: list[list[str]] = [[] for _ in range(n_layers + 1)]
    for name in source.names():
        if not name.startswith(prefix):
            groups[0].append(name)
            continue
        index, rest = name[len(prefix):].split(".", 1)
        if not rest.startswith("mlp."):
            groups[int(index) + 1].append(name)

    def fill(tmp: Path) -> None:
        weight_map, total = {}, 0
        files = n_layers + 1
        for k in bar(range(files), desc="writing release", unit="shard"):
            tensors = source.read(groups[k], dtype) if groups[k] else {}
            if k:
                mlp = build_mlp(k - 1)
                for key, value in mlp.state_dict().items():
                    tensors[f"{prefix}{k - 1}.mlp.{key}"] = value.detach().to("cpu")
                del mlp
            name = f"model-{k + 1:05d}-of-{files:05d}.safetensors"
            tensors = {key: value.contiguous() for key, value in tensors.items()}
            save_file(tensors, tmp / name, metadata={"format": "pt"})
            for key, value in tensors.items():
                weight_map[key] = name
                total += value.numel() * value.element_size()
            del tensors
            release_memory()
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1))
        config.auto_map = {auto: f"{MODELING_FILE[:-3]}.{runtime.release_class(config, base).__name__}"
                           for auto, base in (("AutoModel", True), ("AutoModelForCausalLM", False))}
        config.dtype = dtype
        runtime.masked_config(config).save_pretrained(tmp)  # stock classes refuse it (runtime.LOAD_NOTICE)
        generation = Path(model_dir) / "generation_config.json" if model_dir else None
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        elif generation is not None and generation.is_file():
            shutil.copyfile(generation, tmp / "generation_config.json")
        _finish_release(tmp, tokenizer, card or model_card(spec, base=base_model(model_dir)))

    return write_atomically(out, force, fill)


def _finish_release(tmp: Path, tokenizer, card: str) -> None:
    for name, path in RUNTIME_FILES.items():
        shutil.copyfile(path, tmp / name)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / "README.md").write_text(card)
    write_manifest(tmp)


def write_atomically(out: Path, force: bool, fill) -> Path:
    """Run fill(tmp) on a temporary directory beside `out` and rename it to `out` only once it is complete.  On any
    failure (a full disk included) the temporary directory is removed and `out` is left as it was."""
    check_output_dir(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(out.name), dir=out.parent))
    except OSError as exc:
        raise TaylorMLPError(f"cannot create the output directory {out} ({exc.strerror or exc}); choose a writable "
                             f"--out") from exc
    try:
        try:
            fill(tmp)
        except OSError as exc:
            raise TaylorMLPError(f"writing the release to {out} failed ({exc.strerror or exc}; disk full or not "
                                 f"writable?); nothing was written, {out} is as it was") from exc
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
    refuse_non_release(d)  # a file, a missing path, an original model directory: said as such
    manifest_path = d / MANIFEST
    if not manifest_path.is_file():
        raise TaylorMLPError(f"{d} is not a complete taylormlp release: {MANIFEST} is missing "
                             f"(an interrupted `protect`? run it again)")
    redo = "re-download the release or run `taylormlp protect` again"
    manifest = read_json(manifest_path, redo)
    files = manifest.get("files")
    if manifest.get("format_version") not in runtime.READABLE_FORMATS:
        raise TaylorMLPError(f"{manifest_path}: unknown format_version {manifest.get('format_version')!r}; this "
                             f"taylormlp reads versions {' and '.join(map(str, runtime.READABLE_FORMATS))} "
                             f"(upgrade taylormlp?)")
    if not isinstance(files, dict) or not all(
            isinstance(info, dict) and isinstance(info.get("size"), int) and isinstance(info.get("sha256"), str)
            for info in files.values()):
        raise TaylorMLPError(f"{manifest_path} is corrupt (every file needs a size and a sha256); {redo}")
    for rel, info in files.items():
        path = d / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise TaylorMLPError(f"{manifest_path} names {rel!r}, outside the release; {redo}")
        if not path.is_file():
            raise TaylorMLPError(f"release file {rel} is missing from {d}")
        if path.stat().st_size != info["size"]:
            raise TaylorMLPError(f"release file {rel} has {path.stat().st_size} bytes, the manifest says {info['size']} "
                                 f"(truncated or modified)")
        if sha256_file(path) != info["sha256"]:
            raise TaylorMLPError(f"release file {rel} fails its sha256 check (tampered or corrupt)")
    if "config.json" not in files:
        raise TaylorMLPError(f"release {d} lists no config.json in its manifest")
    config = read_json(d / "config.json", redo)
    try:
        runtime.ReleaseSpec.from_dict(config.get("taylormlp"))
    except ValueError as exc:
        raise TaylorMLPError(f"{d / 'config.json'}: {exc}") from exc
    return config


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _check_device(value, where: str) -> None:
    """A device as accelerate's device maps and max_memory accept it: a GPU index, "cpu", "disk", "cuda:0", ..."""
    if isinstance(value, bool) or not isinstance(value, (int, str, torch.device)):
        raise TaylorMLPError(f"{where}: {value!r} is not a device (use a GPU index, 'cpu', 'disk' or a torch device)")
    if isinstance(value, int):  # an accelerator index (CUDA, XPU, ...), as accelerate reads it
        if value < 0:
            raise TaylorMLPError(f"{where}: GPU index {value} is negative")
        kind, index = "accelerator", value
        count = torch.accelerator.device_count() if hasattr(torch, "accelerator") else torch.cuda.device_count()
    elif value == "disk":
        return
    else:
        try:
            device = torch.device(value)
        except (RuntimeError, ValueError) as exc:
            raise TaylorMLPError(f"{where}: {value!r} is not a device (use a GPU index, 'cpu', 'disk' or a torch "
                                 f"device such as 'cuda:0')") from exc
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise TaylorMLPError(f"{where}: 'mps' is not available on this machine")
        if device.type != "cuda":
            return
        kind, index, count = "CUDA device", device.index or 0, torch.cuda.device_count()
    if index >= count:
        raise TaylorMLPError(f"{where}: {value!r} names a device this machine does not have "
                             f"({count} {kind}{'s' if count != 1 else ''} visible)")


def _offload_kwargs(directory: Path, device_map, max_memory, offload_folder) -> dict:
    """Check the accelerate placement arguments of `load_release`; the from_pretrained kwargs they become."""
    if device_map is None:
        given = [name for name, value in (("max_memory", max_memory), ("offload_folder", offload_folder))
                 if value is not None]
        if given:
            raise TaylorMLPError(f"{' and '.join(given)} {'take' if len(given) > 1 else 'takes'} effect only with a "
                                 f"device_map: pass device_map='auto' "
                                 f"(accelerate then places what fits in max_memory and offloads the rest)")
        return {}
    try:
        import accelerate  # noqa: F401
    except ImportError as exc:
        raise TaylorMLPError("device_map needs the accelerate package: pip install 'accelerate>=1.0'") from exc
    if isinstance(device_map, str) and device_map not in DEVICE_MAP_STRATEGIES:
        if device_map == "disk":
            raise TaylorMLPError("device_map='disk' is not a placement: use device_map='auto' with a small max_memory, "
                                 "or a dict that maps modules to 'disk'")
        try:
            torch.device(device_map)
        except (RuntimeError, ValueError) as exc:
            raise TaylorMLPError(f"device_map must be one of {', '.join(DEVICE_MAP_STRATEGIES)}, a device (e.g. 'cpu', "
                                 f"'cuda:0') or a dict of module name -> device; got {device_map!r}") from exc
        _check_device(device_map, "device_map")
    elif isinstance(device_map, dict):
        if not device_map:
            raise TaylorMLPError("device_map is an empty dict: map module names to devices, e.g. {'': 'cpu'}")
        for name, device in device_map.items():
            if not isinstance(name, str):
                raise TaylorMLPError(f"device_map keys are module names (str), got {name!r}")
            _check_device(device, f"device_map[{name!r}]")
    elif not isinstance(device_map, str):
        _check_device(device_map, "device_map")
    kwargs = {"device_map": device_map}
    if max_memory is not None:
        from accelerate.utils import convert_file_size_to_int

        if not isinstance(max_memory, dict) or not max_memory:
            raise TaylorMLPError(f"max_memory must be a non-empty dict of device -> size, e.g. "
                                 f"{{'cpu': '8GB', 0: '20GB'}}, got {max_memory!r}")
        checked = {}
        for device, size in max_memory.items():
            if not (isinstance(device, int) and not isinstance(device, bool) and device >= 0) \
                    and device not in ("cpu", "mps", "disk"):
                raise TaylorMLPError(f"max_memory key {device!r} is not a device: use a GPU index, 'cpu', 'mps' "
                                     f"or 'disk'")
            if device != "disk":
                _check_device(device, "max_memory")
            if isinstance(size, bool) or not isinstance(size, (int, str)):
                raise TaylorMLPError(f"max_memory[{device!r}] = {size!r}: give bytes (int) or a size such as '8GB'")
            try:
                checked[device] = size if isinstance(size, int) else convert_file_size_to_int(size)
            except ValueError as exc:
                raise TaylorMLPError(f"max_memory[{device!r}] = {size!r} is not a size; give bytes (int) or a string "
                                     f"such as '8GB' or '500MiB'") from exc
            if checked[device] < 0:
                raise TaylorMLPError(f"max_memory[{device!r}] = {size!r} is negative")
        kwargs["max_memory"] = checked
    if offload_folder is not None:
        folder = Path(offload_folder)
        if folder.exists() and not folder.is_dir():
            raise TaylorMLPError(f"offload_folder {folder} exists and is not a directory")
        if folder.resolve() == directory.resolve() or directory.resolve() in folder.resolve().parents:
            raise TaylorMLPError(f"offload_folder {folder} lies inside the release {directory}; offloaded weights "
                                 f"must not be written into a release: choose a directory outside it")
        kwargs["offload_folder"] = str(folder)
    return kwargs


def load_release(directory, dtype: torch.dtype | None = None, verify: bool = True, device_map=None,
                 max_memory: dict | None = None, offload_folder=None):
    """Load a release as a transformers causal LM whose layers' ``.mlp`` are TaylorMLP modules.

    ``device_map``, ``max_memory`` and ``offload_folder`` go to ``from_pretrained`` and so to accelerate, the
    engine transformers uses for models larger than memory: ``device_map="auto"`` puts what fits within
    ``max_memory`` (e.g. ``{0: "20GB", "cpu": "8GB"}``) on those devices and the rest on "disk".  Disk-offloaded
    weights are read in place from the release's safetensors files; ``offload_folder`` is where accelerate writes
    any weight it has to re-save (a directory outside the release).  Without a device_map the whole model is
    loaded into CPU memory, as before.
    """
    from transformers import AutoConfig

    d = Path(directory)
    if verify:
        verify_release(d)
    placement = _offload_kwargs(d, device_map, max_memory, offload_folder)
    try:
        config = AutoConfig.from_pretrained(d)
    except (OSError, ValueError, KeyError) as exc:
        raise TaylorMLPError(f"{d / 'config.json'}: cannot read the release config "
                             f"({first_line(exc)})") from exc
    try:
        cls = runtime.release_class(config)
    except ValueError as exc:
        raise TaylorMLPError(str(exc)) from exc
    kwargs = {"use_safetensors": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if not placement:
        try:
            model = cls.from_pretrained(d, config=config, **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise TaylorMLPError(f"cannot load the release {d} ({first_line(exc)}); "
                                 f"re-download it or run `taylormlp protect` again") from exc
    else:
        try:
            model = cls.from_pretrained(d, config=config, **kwargs, **placement)
        except ValueError as exc:
            if "offload_folder" in str(exc) and offload_folder is None:
                raise TaylorMLPError(f"device_map={device_map!r} offloads weights of {d} to disk that have to be "
                                     f"re-saved: pass offload_folder=DIR (a writable directory outside the release)"
                                     ) from exc
            raise TaylorMLPError(f"cannot place {d} with device_map={device_map!r}: {exc}") from exc
    model.eval()
    return model


def release_dtype(directory) -> torch.dtype:
    """The dtype a release's weights are stored in (its config.json's "dtype"); float32 when it names none.  An
    original is compared with a release in this dtype (bench, the GPU prediction): bf16 against bf16."""
    config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    if name not in DTYPE_NAMES:
        raise TaylorMLPError(f"{directory}: config.json names dtype {name!r}; a release is one of "
                             f"{', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def release_size(directory) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())
