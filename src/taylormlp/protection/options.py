"""What a protect run can be asked for: the presets and ProtectOptions, checked in one place.

The tables (PRESETS, SELECTIONS, BASES, MAX_ORDER, MAX_PIECES) are defined in choices.py, which the CLI reads
without importing torch; a preset fills every option the caller left as None.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

from ..common.choices import BASES, MAX_ORDER, MAX_PIECES, PRESETS, SELECTIONS  # noqa: F401 - defined in choices.py
from ..common.errors import TaylorMLPError


@dataclass
class ProtectOptions:
    preset: str = "default"
    basis: str | None = None
    order: int | None = None
    coverage: float | None = None  # None: as large as possible while token-exact on validation
    selection: str | None = None
    margin: float | None = None  # widen each calibrated interval by this share of its width on each side
    seed: int = 0
    continuation_tokens: int = 48
    max_length: int = 256
    prose_chars: int = 30_000
    search_steps: int = 9
    # the coverage search accepts a coverage only if validation is token-exact AND the largest logit error stays
    # within this budget: exactness on validation alone leaves no margin for unseen prompts
    error_budget: float | None = None
    # how far past its calibrated interval a channel's series is trusted before the runtime's linear continuation
    # takes over: as far as |series - activation| <= max(in-interval error, trust_tolerance), at most trust_max
    # half widths (0 disables: clamp at the calibrated edge)
    trust_tolerance: float = 1e-3
    trust_max: float = 4.0
    # piecewise series: split a channel's interval (bisection, worst piece first) while the degree-N series misses
    # the activation by more than piece_tolerance, up to max_pieces pieces per channel.  Every piece is real
    # series work at run time (its own Θ block), so pieces also raise the cost per token.
    max_pieces: int | None = None
    piece_tolerance: float = 1e-4
    piece_order: int | None = None  # decide the pieces as if the order were this (the throttle keeps them fixed)
    # how much calibration work: at most this many prose chunks and this many prompts (None: the whole corpus)
    calibration_samples: int | None = None
    batch_size: int = 128  # prompts generated together (a streamed model onloads each layer once per step and batch)
    batch_tokens: int = 4096  # padded tokens per forward pass in calibration and validation

    def resolved(self) -> "ProtectOptions":
        if self.preset not in PRESETS:
            raise TaylorMLPError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        out = ProtectOptions(**asdict(self))
        for key, value in PRESETS[self.preset].items():
            if getattr(out, key) is None:
                setattr(out, key, value)
        # the Python API's names (with the CLI flag): the CLI's argparse types check each flag first, as typed
        if out.basis not in BASES:
            raise TaylorMLPError(f"basis (--basis) must be one of {', '.join(BASES)}, got {out.basis!r}")
        if not _whole(out.order) or not 1 <= out.order <= MAX_ORDER:
            raise TaylorMLPError(f"order (--order) must be a whole number between 1 and {MAX_ORDER}, got {out.order!r}")
        if out.coverage is not None and not (_finite(out.coverage) and 0.0 <= out.coverage <= 1.0):
            raise TaylorMLPError(f"coverage (--coverage) must be between 0 and 1, got {out.coverage!r}")
        if out.selection not in SELECTIONS:
            raise TaylorMLPError(f"selection must be one of {', '.join(SELECTIONS)}, got {out.selection!r}")
        if not _finite(out.error_budget) or out.error_budget <= 0:
            raise TaylorMLPError(f"error_budget (--error-budget) must be a positive number, got {out.error_budget!r}")
        if not _whole(out.max_pieces) or not 1 <= out.max_pieces <= MAX_PIECES:
            raise TaylorMLPError(f"max_pieces (--max-pieces) must be a whole number between 1 and {MAX_PIECES}, "
                                 f"got {out.max_pieces!r}")
        if not _finite(out.piece_tolerance) or out.piece_tolerance <= 0:
            raise TaylorMLPError(f"piece_tolerance must be a positive number, got {out.piece_tolerance!r}")
        if not (_finite(out.trust_tolerance) and out.trust_tolerance >= 0 and _finite(out.trust_max)
                and out.trust_max >= 1.0):
            raise TaylorMLPError(f"trust_tolerance must be >= 0 and trust_max >= 1, got {out.trust_tolerance!r}, "
                                 f"{out.trust_max!r}")
        if out.calibration_samples is not None and not (_whole(out.calibration_samples)
                                                        and out.calibration_samples >= 1):
            raise TaylorMLPError(f"calibration_samples (--calibration-samples) must be a whole number of at least 1, "
                                 f"got {out.calibration_samples!r}")
        if not all(_whole(v) and v >= 1 for v in (out.batch_size, out.batch_tokens, out.continuation_tokens)) \
                or not _whole(out.max_length) or out.max_length < 2:
            raise TaylorMLPError("batch_size, batch_tokens and continuation_tokens must be positive whole numbers and "
                                 "max_length >= 2")
        if not _whole(out.seed) or out.seed < 0:
            raise TaylorMLPError(f"seed (--seed) must be a whole number of at least 0, got {out.seed!r}")
        if not (_finite(out.margin) and 0.0 <= out.margin <= 1.0):
            raise TaylorMLPError(f"margin must be between 0 and 1, got {out.margin!r}")
        return out


def _finite(value) -> bool:
    """A real number that is neither NaN nor infinite (bool is not a number here)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
