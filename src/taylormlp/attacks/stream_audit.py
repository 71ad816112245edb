"""The closed-form attacks on a release too large to hold, layer by layer (`taylormlp audit --stream`).

coefficient_ratio and factorization recover a layer from that layer's TaylorMLP alone (attacks.layerwise), so the
release is read one decoder layer at a time from its safetensors shards (stream.SafetensorsSource), each attack
recovers the layer, the original's layer (streamed from its source the same way) scores it (attacks.scoring, the
arithmetic of the whole-model audit), and the layer is dropped.  Peak memory is one layer and its float64 blocks,
whatever the depth.  The rebuilt attacker model is not run, so tokens are not matched; factorization checks its
collapse on random block inputs instead of the release's own.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from .. import runtime
from ..common.errors import TaylorMLPError
from ..common.machine import release_memory
from ..common.progress import bar
from ..protection.protector import weights_from_tensors
from ..release.directory import verify_release
from ..release.sources import resolve_source
from ..release.stream import SafetensorsSource, SourceMLPs, read_config
from .context import AuditOptions
from .registry import layerwise
from .scoring import WeightScore, match_channels
from .verdicts import verdict


def release_mlp(source: SafetensorsSource, spec: runtime.ReleaseSpec, prefix: str, i: int) -> runtime.TaylorMLP:
    """Layer i's TaylorMLP with the release's own tensors (its dtype), read from the shards alone."""
    shape = spec.layers[i]
    with torch.device("meta"):
        mlp = runtime.TaylorMLP(spec.family, spec.hidden_size, shape.protected, shape.rest, spec.order, spec.basis,
                                spec.activation, rest_bias=spec.rest_bias, rest_out_bias=shape.rest_out_bias,
                                pieces=shape.pieces)
    head = f"{prefix}.{i}.mlp."
    tensors = source.read([n for n in source.names() if n.startswith(head)])
    try:
        mlp.load_state_dict({n[len(head):]: t for n, t in tensors.items()}, assign=True)
    except RuntimeError as exc:
        raise TaylorMLPError(f"{source.dir}: layer {i}'s MLP tensors do not match the release's config.json "
                             f"({str(exc).splitlines()[0]}); a damaged release") from exc
    return mlp.eval()


def streamed_names(names: list[str]) -> None:
    """Every attack in `names` can run layer by layer; TaylorMLPError naming those that cannot."""
    whole = [n for n in names if layerwise(n) is None]
    if whole:
        able = ", ".join(n for n in names if layerwise(n) is not None) or "coefficient_ratio,factorization"
        raise TaylorMLPError(f"--stream runs only the closed-form attacks; {', '.join(whole)} run(s) the model and "
                             f"need(s) the release whole: use --attacks {able}")


@torch.no_grad()
def streamed_audit(release_dir, names: list[str], original=None, options: AuditOptions | None = None) -> dict:
    """Run the closed-form attacks `names` on the release layer by layer; the report of audit.audit_model, with
    tokens not matched (None) and "streamed": True."""
    streamed_names(names)
    options = options or AuditOptions()
    release_dir = Path(release_dir)
    config = verify_release(release_dir)
    spec = runtime.ReleaseSpec.from_dict(config["taylormlp"])
    arch = runtime.architecture(SimpleNamespace(model_type=config.get("model_type")))
    source = SafetensorsSource(release_dir)
    reference = None
    if original is not None:
        model_dir = resolve_source(original)
        reference = SourceMLPs(SafetensorsSource(model_dir), read_config(model_dir))
    recoveries = {name: layerwise(name) for name in names}
    scores = {name: WeightScore(r.up_to_scale) for name, r in recoveries.items()}
    numbers: dict = {name: {} for name in names}
    seconds = dict.fromkeys(names, 0.0)
    reading = 0.0
    generator = torch.Generator().manual_seed(options.seed)
    for i in bar([i for i, shape in enumerate(spec.layers) if shape.protected], desc="audit layers", unit="layer"):
        start = time.perf_counter()
        mlp = release_mlp(source, spec, arch["layers"], i)
        reading += time.perf_counter() - start
        x = torch.randn(256, spec.hidden_size, generator=generator)
        match = None
        if reference is not None:
            match = match_channels(mlp, weights_from_tensors(reference.tensors(i), arch, i, check=False))
        for name, recovery in recoveries.items():
            start = time.perf_counter()
            rec, found, signs = recovery.recover(mlp, spec.activation, x=x, **options.attack_options.get(name, {}))
            seconds[name] += time.perf_counter() - start
            for key, value in found.items():
                numbers[name][key] = max(numbers[name].get(key, value), value)
            if match is not None:
                scores[name].add(match, rec, signs)
        del mlp, match
        release_memory()
    report = {"release": str(release_dir), "original": None if original is None else str(original),
              "reference": "original" if original is not None else "release", "streamed": True,
              "spec": {k: getattr(spec, k) for k in ("family", "activation", "basis", "order", "coverage", "preset")},
              "protected_channels": int(sum(shape.protected for shape in spec.layers)),
              "layers": sum(1 for shape in spec.layers if shape.protected), "read_time_s": reading, "attacks": {}}
    for name in names:
        out = {"relative_weight_error": None, "wall_time_s": seconds[name], "channels": report["protected_channels"],
               **numbers[name], "queries": 0, "tokens_matched": None, "tokens": None}
        if reference is not None:
            result = scores[name].result()
            if recoveries[name].up_to_scale:
                out["weight_error_up_to_scale"] = result["relative_weight_error"]
            else:
                out.update(result)
                if scores[name].signs:
                    out["sign_accuracy"] = scores[name].sign_accuracy()
        out["verdict"] = verdict(out)
        out["total_time_s"] = seconds[name]
        report["attacks"][name] = out
    report["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return report
