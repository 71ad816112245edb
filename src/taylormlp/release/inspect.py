"""`taylormlp inspect`: what a release holds, from its verified files (and, with a SOURCE, its leak check)."""

from __future__ import annotations

import json
from pathlib import Path

from ..runtime import ReleaseSpec
from .directory import release_size, verify_release
from .kinds import MANIFEST
from .leakcheck import leak_check


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
