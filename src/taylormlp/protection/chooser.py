"""The setting search of `--slowdown` (protection/throttle.Dial asks it): a straight line from predicted FLOPs ratio
to measured slowdown (Line), the settings it can choose (Choice: family of pieces, series order N, coverage) and
SlowdownChooser, which builds a Protector per (family, N), predicts each setting's FLOPs ratio (measure/cost.WorkModel),
validates settings token-exactly and remembers every answer.  How it chooses is in throttle.py's docstring.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..common.errors import TaylorMLPError
from ..common.machine import available_memory
from ..common.progress import status
from ..maths import series
from ..measure.cost import WorkModel, parameter_bytes_read
from .options import ProtectOptions
from .protector import Protector
from .search import largest_accepted, screened_check

TOLERANCE = 0.10  # a choice within ±10% of the target is accepted
MEMORY_SHARE = 0.5  # a candidate whose Θ exceeds this share of the available memory is never held whole


def memory_budget() -> float | None:
    """Bytes a candidate's Θ may take while the slowdown search holds it whole (None: no limit known)."""
    available = available_memory()
    return None if available is None else MEMORY_SHARE * available


# ---------------------------------------------------------------- the predictor


@dataclass
class Line:
    """measured − 1 = a + k·(predicted − 1), fitted to the measurements so far (through 0 with one point; with none,
    k = `prior`: an engine that prices the series at its FLOPs has prior 1)."""

    points: list = field(default_factory=list)
    prior: float | None = None

    def add(self, predicted: float, measured: float) -> None:
        self.points.append((predicted, measured))

    def coefficients(self) -> tuple[float, float]:
        if not self.points and self.prior is not None:
            return 0.0, float(self.prior)
        x = np.array([p - 1.0 for p, _ in self.points])
        y = np.array([m - 1.0 for _, m in self.points])
        if len(self.points) >= 2 and np.ptp(x) > 1e-6:
            k, a = np.polyfit(x, y, 1)
            if k > 0:
                return float(a), float(k)
        k = float((x @ y) / max(x @ x, 1e-12))
        return 0.0, max(k, 1e-3)

    def predicted_for(self, target: float) -> float:
        """The predicted FLOPs ratio expected to measure `target`."""
        a, k = self.coefficients()
        return 1.0 + max(target - 1.0 - a, 0.0) / k

    def measured_for(self, predicted: float) -> float:
        a, k = self.coefficients()
        return 1.0 + a + k * (predicted - 1.0)


@dataclass
class Choice:
    family: str
    order: int
    coverage: float
    predicted: float
    theta_values: int
    validated: bool = True  # token-exact on the whole validation set (False: not checked yet)


# ---------------------------------------------------------------- the joint choice


def exact_key(family: str, order: int, coverage: float) -> tuple:
    """How SlowdownChooser remembers a validation's answer."""
    return family, int(order), round(coverage, 6)


class SlowdownChooser:
    """Builds Protectors for (family, N), predicts, validates and remembers every answer (nothing twice)."""

    def __init__(self, model, ranges, data, base: ProtectOptions, base_flops: float, base_bytes: float | None = None):
        self.model, self.ranges, self.data, self.base, self.base_flops = model, ranges, data, base, base_flops
        self.base_bytes = parameter_bytes_read(model) if base_bytes is None else base_bytes
        self.protectors: dict = {}
        self.splits: dict = {}  # pieces bisected once at the base order, refitted at every N (pieces.split_pieces)
        self.works: dict = {}
        self.exact: dict = {}
        self.checks: dict = {}
        self.trace: list = []

    def options(self, family: str, order: int) -> ProtectOptions:
        fields = {**self.base.__dict__, "order": int(order), "coverage": None}
        if family == "pieces":
            fields["piece_order"] = self.base.order  # pieces decided once, at the base order
        else:  # one series per channel over its calibrated interval widened by 5% (benchmarks/frontier.py's
            # chebyshev-1piece: exact up to 50-75% coverage on SmolLM2 at N = 8, at a third of the pieces' cost)
            fields["max_pieces"], fields["piece_order"], fields["margin"] = 1, None, 0.05
        return ProtectOptions(**fields).resolved()

    def protector(self, family: str, order: int) -> Protector:
        key = (family, int(order))
        if key not in self.protectors:
            self.protectors[key] = Protector(self.model, self.ranges, self.options(family, order), splits=self.splits)
            self.works[key] = WorkModel(self.protectors[key], self.base_flops, self.base_bytes)
        return self.protectors[key]

    def work(self, family: str, order: int) -> WorkModel:
        self.protector(family, order)
        return self.works[(family, int(order))]

    def choice(self, family: str, order: int, coverage: float, validated: bool = True) -> Choice:
        """The setting (family, N, coverage) with its predicted FLOPs ratio and Θ size."""
        work = self.work(family, order)
        return Choice(family, int(order), coverage, work.ratio(coverage), work.theta_size(coverage), validated)

    def _check(self, family: str, order: int):
        key = (family, int(order))
        if key not in self.checks:
            protector = self.protector(family, order)

            def install(coverage: float):
                return protector.installed(coverage, materialize=self.in_memory(family, order, coverage))

            self.checks[key] = screened_check(self.model, self.data.validation, self.base.batch_tokens,
                                              self.base.error_budget, install, self.trace,
                                              extra={"family": family, "order": int(order)})
        return self.checks[key]

    def is_exact(self, family: str, order: int, coverage: float, screen: bool = False) -> bool:
        """Token-exact within the error budget on the whole validation set (screen=True: on its screen only; a full
        answer already known is used instead)."""
        key = exact_key(family, order, coverage)
        if coverage <= 0:
            return True
        if key not in self.exact:
            how = "held whole" if self.in_memory(family, order, coverage) else "layer by layer"
            with status(f"validating {family} N={order} coverage {coverage:.3f} on the "
                        f"{'screen' if screen else 'whole validation set'}, {how}"):
                ok = self._check(family, order)(coverage, screen=screen)  # this protector's candidate, installed
            if screen:
                return ok
            self.exact[key] = ok
        return self.exact[key]

    def largest_exact(self, family: str, order: int, cap: float, steps: int = 5) -> float:
        """Largest coverage <= cap that validates token-exactly (search.largest_accepted: cap itself first, then a
        screened bisection below it)."""
        if cap <= 0:
            return 0.0
        return largest_accepted(lambda c, screen: self.is_exact(family, order, c, screen), cap, steps)

    def theta_bytes(self, family: str, order: int, coverage: float) -> int:
        return self.work(family, order).theta_size(coverage) * getattr(self.model, "dtype", torch.float32).itemsize

    def in_memory(self, family: str, order: int, coverage: float) -> bool:
        """Whether a candidate may be held whole (its Θ within MEMORY_SHARE of the available memory).  One that may
        not is validated layer by layer (each layer's TaylorMLP built when it runs, then dropped), timed on a subset
        of its layers (throughput.measure_ratios) and written layer by layer: the search never holds it whole."""
        budget = memory_budget()
        return budget is None or self.theta_bytes(family, order, coverage) <= budget

    def choose(self, target: float, line: Line, probe: Choice) -> Choice:
        want = line.predicted_for(target)
        if want <= probe.predicted:
            best = self._fewer_channels(target, want, probe)
            if line.measured_for(best.predicted) >= target * (1 - TOLERANCE) or best.coverage <= 0:
                return best
            # exactness, not cost, capped the coverage: keep it and raise the order of that family instead
            return self._more_orders(target, want, line, best)
        return self._more_orders(target, want, line, probe)

    def _fewer_channels(self, target: float, want: float, probe: Choice) -> Choice:
        """Coverage drops: each family's largest exact coverage within the predicted cost; the largest wins."""
        base = self.base.order
        candidates = [("pieces", base), ("one-piece", base), ("one-piece", max(2, base // 2))]
        capped = []
        for family, order in candidates:
            work = self.work(family, order)
            cap = work.max_coverage(want)
            if family == "pieces" and order == base:
                cap = min(cap, probe.coverage)  # the probe's exact coverage bounds the preset family
            capped.append((cap, -work.theta_size(cap), family, order))
        best = None
        for cap, _, family, order in sorted(capped, reverse=True):
            if best is not None and cap <= best.coverage:
                break  # cannot beat what is already exact
            choice = self.choice(family, order, self.largest_exact(family, order, cap))
            if best is None or (choice.coverage, -choice.theta_values) > (best.coverage, -best.theta_values):
                best = choice
        return best

    def _more_orders(self, target: float, want: float, line: Line, probe: Choice) -> Choice:
        """Coverage stays at `probe`'s, N grows (same family) to the smallest order predicted to reach the target."""
        family = probe.family
        lo, hi = probe.order, series.MAX_ORDER
        top = self.work(family, hi).ratio(probe.coverage)
        if line.measured_for(top) < target * (1 - TOLERANCE):
            reach = line.measured_for(top)
            raise TaylorMLPError(f"a {target}x slowdown is out of reach for this model on this machine: the most "
                                 f"orders ({hi}) at coverage {probe.coverage:.3f} measure about {reach:.1f}x; ask "
                                 f"for at most {reach * (1 + TOLERANCE):.1f}x")
        while hi - lo > 1:  # predicted ratio grows with N: bisection, no measurement
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.work(family, mid).ratio(probe.coverage) < want else (lo, mid)
        # validated only if it is kept (exact_choice): timing does not need it
        choice = self.choice(family, hi, probe.coverage, validated=False)
        if self.exact.get(exact_key(family, hi, probe.coverage)) is False:  # known not exact: exact coverage below
            choice = self.exact_choice(choice)
        return choice

    def exact_choice(self, choice: Choice) -> Choice:
        """`choice` if it is token-exact on the whole validation set, else the same family and order at the largest
        exact coverage below (screened bisection)."""
        coverage = choice.coverage
        if not choice.validated and not self.is_exact(choice.family, choice.order, coverage):
            coverage = self.largest_exact(choice.family, choice.order, coverage)
        return self.choice(choice.family, choice.order, coverage)
