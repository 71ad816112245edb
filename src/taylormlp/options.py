"""What a protect run can be asked for: the presets and ProtectOptions, checked in one place.

The tables (PRESETS, SELECTIONS, BASES, MAX_ORDER, MAX_PIECES) are defined in choices.py, which the CLI reads
without importing torch; a preset fills every option the caller left as None.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .choices import BASES, MAX_ORDER, MAX_PIECES, PRESETS, SELECTIONS  # noqa: F401 - defined in choices.py
from .errors import TaylorMLPError


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
        if out.basis not in BASES:
            raise TaylorMLPError(f"--basis must be one of {', '.join(BASES)}, got {out.basis!r}")
        if not 1 <= out.order <= MAX_ORDER:
            raise TaylorMLPError(f"--order must be between 1 and {MAX_ORDER}, got {out.order}")
        if out.coverage is not None and not 0.0 <= out.coverage <= 1.0:
            raise TaylorMLPError(f"--coverage must be between 0 and 1, got {out.coverage}")
        if out.selection not in SELECTIONS:
            raise TaylorMLPError(f"selection must be one of {', '.join(SELECTIONS)}, got {out.selection!r}")
        if out.error_budget <= 0:
            raise TaylorMLPError(f"error_budget must be positive, got {out.error_budget}")
        if not 1 <= out.max_pieces <= MAX_PIECES or out.piece_tolerance <= 0:
            raise TaylorMLPError(f"max_pieces must be in 1..{MAX_PIECES} and piece_tolerance positive, got "
                                 f"{out.max_pieces}, {out.piece_tolerance}")
        if out.trust_tolerance < 0 or out.trust_max < 1.0:
            raise TaylorMLPError("trust_tolerance must be >= 0 and trust_max >= 1")
        if out.calibration_samples is not None and out.calibration_samples < 1:
            raise TaylorMLPError(f"--calibration-samples must be at least 1, got {out.calibration_samples}")
        if out.batch_size < 1 or out.batch_tokens < 1 or out.max_length < 2 or out.continuation_tokens < 1:
            raise TaylorMLPError("batch_size, batch_tokens and continuation_tokens must be positive and max_length >= 2")
        if not 0.0 <= out.margin <= 1.0:
            raise TaylorMLPError(f"margin must be between 0 and 1, got {out.margin}")
        return out
