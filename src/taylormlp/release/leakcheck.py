"""Byte-level leak check: is any protected down-projection column or bias stored verbatim in a release?

The scan reads the safetensors files as raw bytes (8-byte header length, JSON header, data) — no torch,
no pickle — and compares every row and every column of every stored tensor against the original's
down-projection columns and output bias, converted to the release's dtype, by exact byte equality.
Columns of *unprotected* channels are legitimately stored in ``*.rest.down.weight``; they are counted,
not flagged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import runtime
from .shards import read_safetensors_raw
from .sources import load_base


def _to_release_bytes(t: torch.Tensor, st_dtype: str) -> np.ndarray:
    if st_dtype == "BF16":
        return t.to(torch.bfloat16).view(torch.uint16).numpy()
    if st_dtype == "F16":
        return t.to(torch.float16).numpy()
    if st_dtype == "F64":
        return t.double().numpy()
    return t.float().numpy()


def classify(name: str) -> str:
    if ".rest." in name:
        return "unprotected channels, ordinary MLP weights"
    if name.endswith("mlp.theta"):
        return "series coefficients Θ (protected channels)"
    if name.endswith("mlp.gate.weight"):
        return "gate rows of protected channels (times ±1 signs)"
    if name.endswith("mlp.up.weight"):
        return "up rows of protected channels (public, as in the paper)"
    if name.endswith("mlp.z0"):
        return "expansion points z0 (times ±1 signs)"
    if name.endswith("mlp.h"):
        return "interval half widths"
    return "base model (attention, embeddings, norms, head), released as is"


def leak_check(release_dir, source) -> dict:

    original, _, _ = load_base(source)
    arch = runtime.architecture(original.config)
    columns, biases = {}, []
    for layer in runtime.decoder_layers(original):
        mlp = layer.mlp
        W = runtime.linear_weight(getattr(mlp, arch["down"])).detach()  # [d, I]
        columns.setdefault("_W", []).append(W)
        down = getattr(mlp, arch["down"])
        if down.bias is not None:
            biases.append(down.bias.detach())
    leaks, tensors, allowed = [], [], 0
    cache: dict[str, set] = {}
    files = sorted(Path(release_dir).glob("*.safetensors"))
    for file in files:
        for name, st_dtype, arr in read_safetensors_raw(file):
            tensors.append({"name": name, "file": file.name, "dtype": st_dtype, "shape": list(arr.shape),
                            "kind": classify(name)})
            if st_dtype not in cache:
                keys = set()
                for W in columns["_W"]:
                    Wb = _to_release_bytes(W, st_dtype)
                    keys.update(Wb[:, j].tobytes() for j in range(Wb.shape[1]))
                cache[st_dtype] = keys
                cache[st_dtype + "/bias"] = {_to_release_bytes(c, st_dtype).tobytes() for c in biases}
            keys, bias_keys = cache[st_dtype], cache[st_dtype + "/bias"]
            if arr.ndim == 2:
                vectors = [arr[:, j] for j in range(arr.shape[1])] + [arr[i] for i in range(arr.shape[0])]
                hits = sum(1 for v in vectors if np.ascontiguousarray(v).tobytes() in keys)
                if hits and name.endswith("rest.down.weight"):
                    allowed += hits
                elif hits:
                    leaks.append(f"{file.name}:{name}: {hits} vectors equal to original down-projection columns")
            elif arr.ndim == 1 and arr.tobytes() in bias_keys and not name.endswith("rest.down.bias"):
                leaks.append(f"{file.name}:{name}: equals an original MLP output bias")
    return {"files": [f.name for f in files], "tensors_scanned": len(tensors), "tensors": tensors,
            "unprotected_columns_in_rest": allowed, "leaks": leaks}
