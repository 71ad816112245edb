"""The one verdict function of the audit: what an attack's numbers mean, every threshold in one table."""

from __future__ import annotations

import math

# Keyed by the result number each threshold judges.
THRESHOLDS = {
    "relative_weight_error": (1e-3, 0.05),  # ‖Ŵ − W‖/‖W‖: below the first "weights recovered", below the second
    #                                         "weights approximately recovered", else "weights not recovered"
    "theta_residual_max": 1e-3,  # no original to score: share of Θ the fitted coefficients leave unexplained
    "fit_residual_max": 1e-3,  # no original to score: relative least-squares residual of the queried block outputs
    "block_relative_diff": 1e-4,  # collapsed blocks vs the release's: "exact" below
    "speedup_vs_release": 1.05,  # the collapsed model this much faster than the release: "throttle removed"
}

# Without an original, an attack vouches for its weights by its own residual: (result key, note when the residual
# is below its threshold, verdict when not).
SELF_CHECKS = (
    ("theta_residual_max", "self-consistent fit", "fit inconsistent"),
    ("fit_residual_max", "fit residual {:.1e}", "fit inexact"),
)


def verdict(out: dict) -> str:
    """The one-line verdict on an attack's result ``out``: one clause per kind of evidence it reports, in this order:
    an imitated block (heldout_relative_mse), a collapsed throttle (block_relative_diff, speedup_vs_release),
    fine-tuning (train_loss_before / _after), recovered weights (relative_weight_error, or the attack's own
    residual when there is no original to score)."""
    clauses = []
    if "heldout_relative_mse" in out:
        clauses.append(f"block imitated to relative MSE {out['heldout_relative_mse']:.1e}")
    if "block_relative_diff" in out:
        clauses.append(_collapse(out))
    if "train_loss_after" in out:
        a, b = out["train_loss_before"], out["train_loss_after"]
        clauses.append(f"no MLP weights recovered; release fine-tuned without them (loss {a:.3f} -> {b:.3f})"
                       if math.isfinite(b) and b < a else
                       f"no MLP weights recovered; fine-tuning did not lower the loss ({a:.3f} -> {b:.3f})")
    weights = _weights(out)
    if weights is not None:
        clauses.append(weights)
    return "; ".join(clauses)


def _collapse(out: dict) -> str:
    exact = out["block_relative_diff"] < THRESHOLDS["block_relative_diff"]
    if "speedup_vs_release" not in out:
        return "collapsed to one matmul" + ("" if exact else " (inexact)")
    s = out["speedup_vs_release"]
    if exact and s > THRESHOLDS["speedup_vs_release"]:
        return f"throttle removed ({s:.2f}x faster than the release)"
    if exact:
        return f"collapsed exactly, no measurable speedup here ({s:.2f}x)"
    return "collapse inexact"


def _weights(out: dict) -> str | None:
    err = out.get("relative_weight_error")
    if err is not None:
        recovered, approximate = THRESHOLDS["relative_weight_error"]
        return ("weights recovered" if err < recovered else
                "weights approximately recovered" if err < approximate else "weights not recovered")
    for key, passed, failed in SELF_CHECKS:
        if key in out:
            if out[key] < THRESHOLDS[key]:
                return f"weights recovered ({passed.format(out[key])}; no original to score)"
            return f"{failed}; recovery unverified"
    return None
