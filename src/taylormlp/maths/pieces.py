"""Series pieces of one layer (numpy only): where each channel's interval is split, and each piece's coefficients.

A channel may be served by several pieces (split_pieces): each piece q is the series construction of
maths/series.py's docstring over its own sub-interval, live on its part of the line; a channel's pieces partition the
real line (outer edges ±inf), so exactly one serves each input.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from . import series


@dataclass
class Pieces:
    """One layer's series pieces (activation coordinates a = z + b).  Piece q belongs to channel owner[q], is fitted
    on [lo[q], hi[q]] with coefficients coeffs[q] over t = (a - mid)/half, and is live for a in
    [edge_lo[q], edge_hi[q]); a channel's pieces partition the real line (its outer edges are ±inf)."""

    owner: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    coeffs: np.ndarray
    edge_lo: np.ndarray
    edge_hi: np.ndarray

    def select(self, channels: np.ndarray) -> "Pieces":
        keep = np.isin(self.owner, channels)
        return Pieces(self.owner[keep], self.lo[keep], self.hi[keep], self.coeffs[keep], self.edge_lo[keep],
                      self.edge_hi[keep])


def single_pieces(lo: np.ndarray, hi: np.ndarray, coeffs: np.ndarray) -> Pieces:
    n = len(lo)
    return Pieces(np.arange(n), lo, hi, coeffs, np.full(n, -np.inf), np.full(n, np.inf))


def split_pieces(basis: str, act: str, lo: np.ndarray, hi: np.ndarray, order: int, tolerance: float,
                 max_pieces: int, split_order: int | None = None, splits: dict | None = None
                 ) -> tuple[Pieces, np.ndarray]:
    """Bisect each channel's interval where the degree-`split_order` (default: N) series misses the activation by
    more than `tolerance`, worst piece first, up to max_pieces per channel; then fit degree N on every piece.
    Returns the pieces and each piece's in-interval error at degree N.  `splits`, a dict the caller owns (the
    slowdown search's, for as long as it runs), remembers bisections decided at a fixed split_order, so that
    the same split refitted at another N is not bisected again."""
    final_order, order = order, (split_order or order)
    key = (basis, act, hashlib.sha1(lo.tobytes() + hi.tobytes()).hexdigest(), order, tolerance, max_pieces)
    if splits is not None and key in splits:  # the same split at another N (--slowdown tries several)
        owner, plo, phi = splits[key]
        coeffs = series.series_coefficients(basis, act, plo, phi, final_order)
        err = approximation_error(basis, act, plo, phi, coeffs)
        return _ordered_pieces(owner, plo.copy(), phi.copy(), coeffs, err)
    owner = np.arange(len(lo))
    plo, phi = lo.copy(), hi.copy()
    coeffs = series.series_coefficients(basis, act, plo, phi, order)
    err = approximation_error(basis, act, plo, phi, coeffs)
    for _ in range(max_pieces - 1):
        counts = np.bincount(owner, minlength=len(lo))
        cand = np.flatnonzero((err > tolerance) & (counts[owner] < max_pieces))
        if cand.size == 0:
            break
        cand = cand[np.lexsort((-err[cand], owner[cand]))]  # by channel, worst first
        worst = cand[np.r_[True, owner[cand][1:] != owner[cand][:-1]]]  # one split per channel per round
        m = (plo[worst] + phi[worst]) / 2.0
        new_lo, new_hi = m, phi[worst].copy()
        phi[worst] = m
        owner = np.concatenate([owner, owner[worst]])
        plo, phi = np.concatenate([plo, new_lo]), np.concatenate([phi, new_hi])
        changed = np.concatenate([worst, np.arange(len(owner) - len(worst), len(owner))])
        coeffs = np.concatenate([coeffs, np.zeros((len(worst), order + 1))])
        err = np.concatenate([err, np.zeros(len(worst))])
        coeffs[changed] = series.series_coefficients(basis, act, plo[changed], phi[changed], order)
        err[changed] = approximation_error(basis, act, plo[changed], phi[changed], coeffs[changed])
    if order != final_order:
        coeffs = series.series_coefficients(basis, act, plo, phi, final_order)
        err = approximation_error(basis, act, plo, phi, coeffs)
    if splits is not None and split_order is not None:
        splits[key] = (owner, plo.copy(), phi.copy())
    return _ordered_pieces(owner, plo, phi, coeffs, err)


def _ordered_pieces(owner, plo, phi, coeffs, err) -> tuple[Pieces, np.ndarray]:
    """Pieces sorted by channel then position, each channel's outer edges open to ±inf."""
    perm = np.lexsort((plo, owner))
    owner, plo, phi, coeffs, err = owner[perm], plo[perm], phi[perm], coeffs[perm], err[perm]
    first = np.r_[True, owner[1:] != owner[:-1]]
    last = np.r_[owner[1:] != owner[:-1], True]
    edge_lo = np.where(first, -np.inf, plo)
    edge_hi = np.where(last, np.inf, phi)
    return Pieces(owner, plo, phi, coeffs, edge_lo, edge_hi), err


def approximation_error(basis: str, act: str, lo: np.ndarray, hi: np.ndarray, coeffs: np.ndarray,
                        points: int = 65) -> np.ndarray:
    """max over a grid of |series(t) - act(a)| on each channel's interval (float64)."""
    t = np.cos(np.linspace(0.0, math.pi, points))
    return series.series_error(basis, act, lo, hi, coeffs, t).max(-1)
