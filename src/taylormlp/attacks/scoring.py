"""Scoring recovered weights against the original (never used by an attack itself), one layer at a time: the same
arithmetic whether the release is held whole (AuditContext) or streamed layer by layer (audit_stream)."""

from __future__ import annotations

import numpy as np
import torch


def _unit_rows(m: torch.Tensor) -> torch.Tensor:
    return m / m.norm(dim=1, keepdim=True).clamp_min(1e-30)


def match_channels(mlp, w) -> dict:
    """The original channel index and sign of every released channel of one layer (`mlp`: a TaylorMLP; `w`: the
    original's MLP weights, protector.MLPWeights): by cosine of the gate rows, sharpened by the up rows (unsigned
    copies) in gated MLPs."""
    V = w.V.double()
    G = mlp.gate.weight.detach().double()
    cos = _unit_rows(G) @ _unit_rows(V).T  # [P, I]
    if mlp.up is not None:
        score = _unit_rows(mlp.up.weight.detach().double()) @ _unit_rows(w.U.double()).T + cos.abs()
    else:
        score = cos.abs()
    idx = score.argmax(1)
    sign = torch.sign(cos.gather(1, idx[:, None])[:, 0])
    return {"index": idx, "sign": sign, "weights": w, "unique": bool(len(set(idx.tolist())) == len(idx))}


class WeightScore:
    """Running relative ‖Ŵ − W‖/‖W‖ over the protected down columns of the layers added (and bias errors for the
    plain family), and the share of recovered ±1 signs that are the true ones."""

    def __init__(self, up_to_scale: bool = False):
        self.up_to_scale = up_to_scale  # best per-column scale first (attacks that recover W only up to a factor)
        self.num = self.den = self.bnum = self.bden = self.cnum = self.cden = 0.0
        self.per_layer: list[float] = []
        self.agree = self.signs = 0

    def add(self, match: dict, recovered, sign=None) -> None:
        w = match["weights"]
        W = w.W.double()[:, match["index"]]
        What = recovered.W
        if self.up_to_scale:
            scale = (What * W).sum(0) / (What * What).sum(0).clamp_min(1e-300)
            What = What * scale
        e, n = float(((What - W) ** 2).sum()), float((W ** 2).sum())
        self.num, self.den = self.num + e, self.den + n
        self.per_layer.append(float(np.sqrt(e / max(n, 1e-300))))
        if w.b is not None and recovered.b is not None:
            b = w.b.double()[match["index"]]
            self.bnum += float(((recovered.b - b) ** 2).sum())
            self.bden += float((b ** 2).sum())
        if w.c is not None and recovered.c is not None:
            self.cnum += float(((recovered.c - w.c.double()) ** 2).sum())
            self.cden += float((w.c.double() ** 2).sum())
        if sign is not None:
            self.count_signs(match, sign)

    def count_signs(self, match: dict, sign) -> None:
        """Count one layer's recovered ±1 signs (array or tensor) against the true ones."""
        self.agree += int((torch.as_tensor(sign) == match["sign"]).sum())
        self.signs += len(sign)

    def result(self) -> dict:
        out = {"relative_weight_error": float(np.sqrt(self.num / max(self.den, 1e-300))),
               "per_layer_max": float(max(self.per_layer)) if self.per_layer else 0.0}
        if self.bden > 0:
            out["relative_bias_error"] = float(np.sqrt(self.bnum / self.bden))
        if self.cden > 0:
            out["relative_output_bias_error"] = float(np.sqrt(self.cnum / self.cden))
        return out

    def sign_accuracy(self) -> float:
        return self.agree / max(self.signs, 1)
