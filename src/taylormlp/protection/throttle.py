"""`--slowdown X`: choose coverage, series order N and pieces jointly so that decoding is X times slower.

The throttle is the series itself: a protected channel j with q_j pieces replaces one row of the down projection
(and its gate/up work stays) by (N+1)·q_j columns of Θ, so per decoded token it adds

    extra MACs_j = d · ((N+1)·q_j − 1)                  (gated and plain MLPs alike)

on top of the original's work.  That is the cheap, machine-independent predictor: the FLOPs ratio of any
setting (family of pieces, N, coverage c — channels taken easiest first) is 1 + 2·Σ extra / FLOPs(original).
What a machine makes of FLOPs is measured: decode latency of the original and the release, interleaved, maps
predicted FLOPs ratios to measured slowdowns by a straight line fitted to the measurements so far.  Every
measurement runs at the serving batch B (`--serving-batch`, default 1): B copies of one prompt decoded together, so
the slowdown met is the throughput ratio a server batching B requests pays (it grows with B on a CPU).  The
chosen setting's curve (batch 1, 8, 32 and B) is measured once more, in one interleaved run, and recorded with
the FLOPs and bytes ratios (WorkModel), the machine and the engine; a curve more than 10% from the accepted figure
at B gets one more read at B, and the figure recorded is the median of every read at B (`curve_agrees` says which).

Choice, for a target X in [1.25, 16]:

* the preset (piecewise series at its base order) at its largest token-exact coverage is the probe — measured;
* below the probe's slowdown, coverage drops: for each candidate family (the preset's pieces at the base order,
  one series per channel — interval widened by 5% — at the base order and at half of it), the largest coverage whose predicted slowdown
  stays within X, checked token-exact on validation (bisected down if it is not); the largest exact coverage
  wins (ties: the smaller release);
* above it, coverage stays at the probe's and N grows (the pieces are kept as decided at the base order) to the
  smallest N predicted to reach X;
* the choice is measured; if it misses X by more than 10%, the line is refitted with that measurement and the
  choice made again (at most `rounds` rounds, each one setting measured; a round whose choice is the setting just
  read reads it once more).  A read within ±10% is confirmed by a second independent
  interleaved read before it is accepted, on the median of the choice's reads.  A higher-order candidate is timed before it is
  validated, and validated only if it is kept: timing does not depend on exactness, and a validation at high N is
  the dearest step of the search (8x on SmolLM2: 85-113 s; 16x: minutes, layer by layer).  Should the kept one
  not be token-exact, its largest exact coverage below is taken and measured instead.

The high end is memory: decode slowdown follows bytes of Θ read per token (16x on SmolLM2 is ~18 GB of float32 Θ).
A candidate whose Θ exceeds MEMORY_SHARE of the available memory is never held whole: it is validated layer by
layer (protector.CandidateMLP builds each layer's TaylorMLP when it runs and drops it), timed on evenly spaced layers
with the rest original and scaled by their share of the extra work (throughput.measure_ratios), and written layer by
layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..common.choices import ROUNDS, SLOWDOWN_RANGE
from ..common.errors import TaylorMLPError
from ..common import machine
from ..common.machine import available_memory
from ..common.progress import log, status
from ..maths import series
from ..measure.cost import WorkModel, flops_per_token, parameter_bytes_read
from ..measure.throughput import curve_batches, measure_prompt_ids, measure_ratios
from ..measure.workload import Workload, workload_prompts
from .options import ProtectOptions
from .protector import Protector
from .search import Setting, choose_coverage, largest_accepted, screened_check

TOLERANCE = 0.10  # a choice within ±10% of the target is accepted
CONFIRM_READS = 2  # ... on the median of at least this many independent interleaved reads
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


def _exact_key(family: str, order: int, coverage: float) -> tuple:
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
        key = _exact_key(family, order, coverage)
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
        if self.exact.get(_exact_key(family, hi, probe.coverage)) is False:  # known not exact: exact coverage below
            choice = self.exact_choice(choice)
        return choice

    def exact_choice(self, choice: Choice) -> Choice:
        """`choice` if it is token-exact on the whole validation set, else the same family and order at the largest
        exact coverage below (screened bisection)."""
        coverage = choice.coverage
        if not choice.validated and not self.is_exact(choice.family, choice.order, coverage):
            coverage = self.largest_exact(choice.family, choice.order, coverage)
        return self.choice(choice.family, choice.order, coverage)


def aimed(value, phase: str) -> float:
    """A measured value's ratio in the phase the dial aims at: the value itself, or its `phase` entry."""
    return value[phase] if isinstance(value, dict) else value


def choose_slowdown(model, tokenizer, chat: bool, prepared: tuple, opts: ProtectOptions, target: float, measure=None,
                    rounds: int = ROUNDS, serving_batch: int = 1, workload: Workload | None = None) -> Setting:
    """Step 3 of the protect flow for --slowdown (flow.run): the setting whose measured decode slowdown at batch
    `serving_batch` (the throughput ratio of B concurrent sequences) is within ±10% of `target`, coverage as large as
    that allows, calibrated by `prepared` = (CalibrationData, Ranges).  Its Setting says whether its Θ fits in memory
    (`held`; if not, the release is validated and written layer by layer from protector.build) and carries the
    slowdown record.  The choice's slowdown curve (throughput.curve_batches) is measured once more, in one interleaved
    run, and recorded.  `measure(protector, coverage, batches)` -> {batch: measured ratio} (default:
    throughput.measure_ratios, interleaved decode timing on this machine; tests inject a deterministic one); its
    `engine` attribute, where it has one, describes the engine for the record (vllm_dial.EngineDial).  A measured
    value is a ratio, or {phase: ratio} for decode.PHASES; the dial aims at the decode phase, or with a `workload`
    (--workload P:G: B distinct prompts of P tokens, G generated tokens each) at the whole request's, and the record
    keeps every phase at batch 1 and B (its curve is then read at those two only)."""
    lo, hi = SLOWDOWN_RANGE
    if not lo <= target <= hi:
        raise TaylorMLPError(f"--slowdown must be between {lo} and {hi}, got {target}")
    if not isinstance(serving_batch, int) or isinstance(serving_batch, bool) or serving_batch < 1:
        raise TaylorMLPError(f"serving_batch (--serving-batch) must be a whole number of at least 1, "
                             f"got {serving_batch!r}")
    batch = serving_batch
    base = opts.resolved()
    data, ranges = prepared
    if not data.validation:
        raise TaylorMLPError("--slowdown needs validation prompts to keep the release token-exact")
    details: dict = {}
    phase = "request" if workload is not None else "decode"
    prior = getattr(measure, "prior", None)  # an engine's cost per unit of series work before any read (EngineDial)
    curve_at = curve_batches(batch) if workload is None else tuple(sorted({1, batch}))
    if measure is None:
        if workload is None:
            ids, steps = measure_prompt_ids(tokenizer, chat), 24
        else:
            ids = torch.tensor(workload_prompts(tokenizer, workload.prompt_tokens, max(curve_at)))
            steps = workload.new_tokens - 1

        def measure(protector, coverage, batches):
            ratios, info = measure_ratios(protector, coverage, ids, batches, new_tokens=steps, budget=memory_budget())
            details.update(info)
            return ratios

    base_flops = flops_per_token(model)
    chooser = SlowdownChooser(model, ranges, data, base, base_flops)
    line = Line(prior=prior)
    measurements, reads, curves = [], {}, {}  # every read at B per setting (_exact_key); its read at every curve batch
    at = f" at batch {batch}" if batch > 1 else ""

    def within(ratio: float) -> bool:
        return abs(ratio / target - 1.0) <= TOLERANCE

    def measured(choice: Choice, batches: tuple = (batch,)) -> float:
        details.clear()
        values = measure(chooser.protector(choice.family, choice.order), choice.coverage, batches)
        if len(batches) > 1:  # a confirming read, taken at every curve batch: the curve if this setting is written
            curves[_exact_key(choice.family, choice.order, choice.coverage)] = values
        value = values[batch]
        ratio = aimed(value, phase)
        if "timed_ratio" in details:
            details["timed_ratio"] = aimed(details["timed_ratio"][batch], phase)
        line.add(choice.predicted, ratio)
        reads.setdefault(_exact_key(choice.family, choice.order, choice.coverage), []).append(ratio)
        measurements.append({"family": choice.family, "order": choice.order, "coverage": choice.coverage,
                             "batch": batch, "flops_ratio": choice.predicted, "measured": ratio, **details,
                             **({"phases": value} if isinstance(value, dict) else {})})
        scaled = (f" (timed on {details['layers_timed']} of {details['layers']} layers: {details['timed_ratio']:.2f}x, "
                  f"scaled by their share of the extra work)" if "timed_ratio" in details else "")
        log(f"{choice.family} N={choice.order} coverage {choice.coverage:.3f}: FLOPs {choice.predicted:.2f}x, "
            f"measured {ratio:.2f}x{at}{scaled}")
        return ratio

    def confirmed(choice: Choice) -> float:
        """The choice's figure: one read, and while the median of its reads is within ±10% of the target, more
        independent interleaved reads until there are CONFIRM_READS, taken at every curve batch (the curve of the
        setting written: no read of its own); the median of them all."""
        key = _exact_key(choice.family, choice.order, choice.coverage)
        if not reads.get(key):
            measured(choice)
        mine = reads[key]
        while within(float(np.median(mine))) and len(mine) < CONFIRM_READS:
            measured(choice, curve_at)
        return float(np.median(mine))

    # the probe: the preset at its largest exact coverage (the same search a plain protect runs)
    probe_protector = chooser.protector("pieces", base.order)
    probed = choose_coverage(probe_protector, data)  # the same search a plain protect runs
    search = probed.trace
    probe = chooser.choice("pieces", base.order, probed.coverage)
    if probe.coverage <= 0.0:
        raise TaylorMLPError("no channel can be protected token-exactly, so no slowdown is possible; "
                             "try the default preset or more calibration text")
    def none_left():
        return TaylorMLPError(f"a {target}x slowdown leaves no channel protected token-exactly; the smallest "
                              f"reachable slowdown here is about {line.measured_for(1.0 + 1e-9):.2f}x")

    def kept(choice: Choice, ratio: float) -> tuple[Choice, float]:
        """A measured choice about to be kept, validated now; not exact: its exact coverage below, measured."""
        if choice.validated:
            return choice, ratio
        exact = chooser.exact_choice(choice)
        if exact.coverage <= 0.0:
            raise none_left()
        return exact, (ratio if exact.coverage == choice.coverage else confirmed(exact))

    if prior is None:  # the probe read fits the line's first point
        ratio = confirmed(probe)
        choice, best, left = probe, (abs(ratio / target - 1.0), probe, ratio), rounds - 1
    else:  # the prior prices the series: the first round's choice is made from it, the probe is not read
        log(f"first choice from the engine's prior ({prior:g}x the FLOPs ratio's excess), not from a read of the probe")
        ratio, choice, best, left = None, probe, (float("inf"), probe, None), rounds
    for _ in range(left):
        if ratio is not None and within(ratio):
            break
        nxt = chooser.choose(target, line, probe)
        if nxt.coverage <= 0.0:
            raise none_left()
        again = (nxt.family, nxt.order, nxt.coverage) == (choice.family, choice.order, choice.coverage)
        if again and reads.get(_exact_key(choice.family, choice.order, choice.coverage)):
            measured(choice)  # the line points at the setting just read: this round reads it once more
            ratio = float(np.median(reads[_exact_key(choice.family, choice.order, choice.coverage)]))
        else:
            choice = nxt
            ratio = confirmed(choice)
        if within(ratio):
            choice, ratio = kept(choice, ratio)
        if abs(ratio / target - 1.0) < best[0]:
            best = (abs(ratio / target - 1.0), choice, ratio)
    _, choice, ratio = best
    ratio = float(np.median(reads[_exact_key(choice.family, choice.order, choice.coverage)]))  # all its reads so far
    if not choice.validated:  # the rounds ran out on an unvalidated candidate: validate the one written
        choice, ratio = kept(choice, ratio)
    if not within(ratio):
        log(f"closest measured slowdown {ratio:.2f}x{at} is outside ±{TOLERANCE:.0%} of the {target}x asked for "
            f"(machine noise or an unreachable target); writing it and saying so in the model card")
    protector = chooser.protector(choice.family, choice.order)
    same = [r for r in chooser.trace if (r["family"], r["order"]) == (choice.family, choice.order)]
    if (choice.family, choice.order) == ("pieces", base.order):
        same = search + same
    whole = chooser.in_memory(choice.family, choice.order, choice.coverage)
    if not whole:
        need, available = chooser.theta_bytes(choice.family, choice.order, choice.coverage), available_memory() or 0
        log(f"the chosen series coefficients take {need / 1e9:.1f} GB, more than {MEMORY_SHARE:.0%} of the "
            f"{available / 1e9:.1f} GB available: validated layer by layer and written layer by layer; running the "
            f"release needs about that much memory (or accelerate offloading: load_release(..., device_map='auto'))")
    key = _exact_key(choice.family, choice.order, choice.coverage)
    mine, accepted = reads.setdefault(key, []), ratio
    if key in curves:  # its confirming read was taken at every curve batch
        phases = curves[key]
    else:
        with status(f"measuring the slowdown curve at batch sizes {', '.join(map(str, curve_at))}"):
            phases = measure(protector, choice.coverage, curve_at)
        mine.append(aimed(phases[batch], phase))
    curve = {b: aimed(v, phase) for b, v in phases.items()}
    log("slowdown curve: " + ", ".join(f"{r:.2f}x at batch {b}" for b, r in sorted(curve.items())))
    if abs(curve[batch] / accepted - 1.0) > TOLERANCE:  # the curve disagrees with the accepted figure: read B again
        log(f"the curve's {curve[batch]:.2f}x at batch {batch} is more than {TOLERANCE:.0%} from the accepted "
            f"{accepted:.2f}x: reading batch {batch} once more")
        measured(choice)
    ratio = float(np.median(mine))  # every read at B of the written setting, the curve's included
    agrees = abs(curve[batch] / ratio - 1.0) <= TOLERANCE
    work = chooser.work(choice.family, choice.order)
    engine = getattr(measure, "engine", None) or {"name": "taylormlp", "mode": "eager", "dtype": str(model.dtype)[6:]}
    record = {"target": target, "serving_batch": batch, "measured": ratio, "flops_ratio": choice.predicted,
              "bytes_ratio": work.bytes_ratio(choice.coverage), "accepted": accepted,
              "reads": mine, "curve_agrees": agrees, "engine": engine, "prior": prior,
              "curve_read": "confirming" if key in curves else "own",
              "curve": [{"batch": b, "measured": r, **({"phases": phases[b]} if isinstance(phases[b], dict) else {})}
                        for b, r in sorted(curve.items())], "phase": phase,
              **({"workload": workload.as_dict()} if workload is not None else {}),
              "within_tolerance": within(ratio), "family": choice.family,
              "machine": machine.describe(), "held_in_memory": whole, "measurements": measurements,
              "validations": chooser.trace}
    if not agrees:
        log(f"the curve's {curve[batch]:.2f}x at batch {batch} stays more than {TOLERANCE:.0%} from the median of "
            f"every read there ({ratio:.2f}x): recorded as measured (curve_agrees false)")
    return Setting(protector, choice.coverage, same, held=whole, slowdown=record)
