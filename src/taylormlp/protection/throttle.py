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
  the dearest step of the search (its cost grows with N, and past the memory budget it runs layer by layer).  Should the kept one
  not be token-exact, its largest exact coverage below is taken and measured instead.

The high end is memory: decode slowdown follows bytes of Θ read per token (16x on SmolLM2 is ~18 GB of float32 Θ).
A candidate whose Θ exceeds MEMORY_SHARE of the available memory is never held whole: it is validated layer by
layer (protector.CandidateMLP builds each layer's TaylorMLP when it runs and drops it), timed on evenly spaced layers
with the rest original and scaled by their share of the extra work (throughput.measure_ratios), and written layer by
layer.
"""

from __future__ import annotations

import numpy as np
import torch

from ..common import machine
from ..common.choices import DIAL_STEPS, ROUNDS, SLOWDOWN_RANGE
from ..common.errors import TaylorMLPError
from ..common.machine import available_memory
from ..common.progress import log, status
from ..measure.cost import flops_per_token
from ..measure.throughput import curve_batches, measure_prompt_ids, measure_ratios
from ..measure.workload import Workload, workload_prompts
from ..release.slowdown import SlowdownRecord
from .chooser import MEMORY_SHARE, TOLERANCE, Choice, Line, SlowdownChooser, exact_key, memory_budget
from .options import ProtectOptions
from .search import Setting, choose_coverage

CONFIRM_READS = 2  # a choice is accepted on the median of at least this many independent interleaved reads


def aimed(value, phase: str) -> float:
    """A measured value's ratio in the phase the dial aims at: the value itself, or its `phase` entry."""
    return value[phase] if isinstance(value, dict) else value


class Dial:
    """Step 3 of the protect flow for --slowdown (flow.run): the setting whose measured slowdown at batch
    `serving_batch` (the throughput ratio of B concurrent sequences) is within ±10% of `target`, coverage as large as
    that allows, calibrated by `prepared` = (CalibrationData, Ranges).  ``run()`` returns its Setting, which says
    whether its Θ fits in memory (`held`; if not, the release is validated and written layer by layer from
    protector.build) and carries the typed record (release/slowdown.SlowdownRecord).

    `measure(protector, coverage, batches)` -> {batch: measured value} (default: throughput.measure_ratios,
    interleaved timing on this machine; engine_dial.EngineDial on an engine; tests inject a deterministic one); its
    `engine` attribute, where it has one, describes the engine for the record, and its `prior` the line's slope
    before any read.  A measured value is a ratio, or {phase: ratio} for common/choices.PHASES; the dial aims at the
    decode phase, or with a `workload` (--workload P:G: B distinct prompts of P tokens, G generated tokens each) at
    the whole request's.  The choice's confirming read is taken at every curve batch (throughput.curve_batches; with
    a workload 1 and B) and recorded as its curve; a choice never confirmed gets a curve read of its own."""

    def __init__(self, model, tokenizer, chat: bool, prepared: tuple, opts: ProtectOptions, target: float,
                 measure=None, rounds: int = ROUNDS, serving_batch: int = 1, workload: Workload | None = None):
        lo, hi = SLOWDOWN_RANGE
        if not lo <= target <= hi:
            raise TaylorMLPError(f"--slowdown must be between {lo} and {hi}, got {target}")
        if not isinstance(serving_batch, int) or isinstance(serving_batch, bool) or serving_batch < 1:
            raise TaylorMLPError(f"serving_batch (--serving-batch) must be a whole number of at least 1, "
                                 f"got {serving_batch!r}")
        self.data, ranges = prepared
        if not self.data.validation:
            raise TaylorMLPError("--slowdown needs validation prompts to keep the release token-exact")
        self.model, self.target, self.batch, self.rounds, self.workload = model, target, serving_batch, rounds, workload
        self.base = opts.resolved()
        self.phase = "request" if workload is not None else "decode"
        self.curve_at = curve_batches(serving_batch) if workload is None else tuple(sorted({1, serving_batch}))
        self.details: dict = {}  # what the default measure adds to a read (layers timed, the ratio before scaling)
        self.measure = measure if measure is not None else self._runtime_measure(tokenizer, chat)
        self.prior = getattr(self.measure, "prior", None)
        self.chooser = SlowdownChooser(model, ranges, self.data, self.base, flops_per_token(model))
        self.line = Line(prior=self.prior)
        self.measurements: list = []
        self.reads: dict = {}  # every read at B, per setting (exact_key)
        self.curves: dict = {}  # a setting's read at every curve batch (its confirming read), per setting
        self.at = f" at batch {serving_batch}" if serving_batch > 1 else ""

    def _runtime_measure(self, tokenizer, chat: bool):
        """throughput.measure_ratios on our runtime: protect's timing prompt, or the workload's prompts."""
        if self.workload is None:
            ids, steps = measure_prompt_ids(tokenizer, chat), DIAL_STEPS
        else:
            ids = torch.tensor(workload_prompts(tokenizer, self.workload.prompt_tokens, max(self.curve_at)))
            steps = self.workload.new_tokens - 1

        def measure(protector, coverage, batches):
            ratios, info = measure_ratios(protector, coverage, ids, batches, new_tokens=steps, budget=memory_budget())
            self.details.update(info)
            return ratios
        return measure

    def within(self, ratio: float) -> bool:
        return abs(ratio / self.target - 1.0) <= TOLERANCE

    def mine(self, choice: Choice) -> list:
        """Every read at B of `choice`'s setting so far."""
        return self.reads.setdefault(exact_key(choice.family, choice.order, choice.coverage), [])

    def read(self, choice: Choice, batches: tuple | None = None) -> float:
        """One interleaved read of `choice` at B (and at `batches`: a confirming read at every curve batch, kept as
        its curve); the line gets the point."""
        batch, details = self.batch, self.details
        details.clear()
        values = self.measure(self.chooser.protector(choice.family, choice.order), choice.coverage,
                              batches or (batch,))
        if batches:
            self.curves[exact_key(choice.family, choice.order, choice.coverage)] = values
        value = values[batch]
        ratio = aimed(value, self.phase)
        if "timed_ratio" in details:
            details["timed_ratio"] = aimed(details["timed_ratio"][batch], self.phase)
        self.line.add(choice.predicted, ratio)
        self.mine(choice).append(ratio)
        self.measurements.append({"family": choice.family, "order": choice.order, "coverage": choice.coverage,
                                  "batch": batch, "flops_ratio": choice.predicted, "measured": ratio, **details,
                                  **({"phases": value} if isinstance(value, dict) else {})})
        scaled = (f" (timed on {details['layers_timed']} of {details['layers']} layers: {details['timed_ratio']:.2f}x, "
                  f"scaled by their share of the extra work)" if "timed_ratio" in details else "")
        log(f"{choice.family} N={choice.order} coverage {choice.coverage:.3f}: FLOPs {choice.predicted:.2f}x, "
            f"measured {ratio:.2f}x{self.at}{scaled}")
        return ratio

    def confirmed(self, choice: Choice) -> float:
        """The choice's figure: one read, and while the median of its reads is within ±10% of the target, more
        independent interleaved reads until there are CONFIRM_READS, taken at every curve batch (the curve of the
        setting written: no read of its own); the median of them all."""
        if not self.mine(choice):
            self.read(choice)
        mine = self.mine(choice)
        while self.within(float(np.median(mine))) and len(mine) < CONFIRM_READS:
            self.read(choice, self.curve_at)
        return float(np.median(mine))

    def none_left(self) -> TaylorMLPError:
        return TaylorMLPError(f"a {self.target}x slowdown leaves no channel protected token-exactly; the smallest "
                              f"reachable slowdown here is about {self.line.measured_for(1.0 + 1e-9):.2f}x")

    def kept(self, choice: Choice, ratio: float) -> tuple[Choice, float]:
        """A measured choice about to be kept, validated now; not exact: its exact coverage below, measured."""
        if choice.validated:
            return choice, ratio
        exact = self.chooser.exact_choice(choice)
        if exact.coverage <= 0.0:
            raise self.none_left()
        return exact, (ratio if exact.coverage == choice.coverage else self.confirmed(exact))

    def rounds_from(self, probe: Choice) -> tuple[Choice, float]:
        """The rounds: the probe read first (no prior) or the prior's choice; after each miss the line refitted and
        the next setting chosen from it (the same one: read once more).  The closest, validated, and its reads'
        median."""
        if self.prior is None:  # the probe read fits the line's first point
            ratio = self.confirmed(probe)
            choice, best, left = probe, (abs(ratio / self.target - 1.0), probe, ratio), self.rounds - 1
        else:  # the prior prices the series: the first round's choice is made from it, the probe is not read
            log(f"first choice from the engine's prior ({self.prior:g}x the FLOPs ratio's excess), not from a read "
                f"of the probe")
            ratio, choice, best, left = None, probe, (float("inf"), probe, None), self.rounds
        for _ in range(left):
            if ratio is not None and self.within(ratio):
                break
            nxt = self.chooser.choose(self.target, self.line, probe)
            if nxt.coverage <= 0.0:
                raise self.none_left()
            again = (nxt.family, nxt.order, nxt.coverage) == (choice.family, choice.order, choice.coverage)
            if again and self.mine(choice):
                self.read(choice)  # the line points at the setting just read: this round reads it once more
                ratio = float(np.median(self.mine(choice)))
            else:
                choice = nxt
                ratio = self.confirmed(choice)
            if self.within(ratio):
                choice, ratio = self.kept(choice, ratio)
            if abs(ratio / self.target - 1.0) < best[0]:
                best = (abs(ratio / self.target - 1.0), choice, ratio)
        _, choice, _ = best
        ratio = float(np.median(self.mine(choice)))  # all its reads so far
        if not choice.validated:  # the rounds ran out on an unvalidated candidate: validate the one written
            choice, ratio = self.kept(choice, ratio)
        return choice, ratio

    def curve_of(self, choice: Choice, accepted: float) -> tuple[dict, dict]:
        """The written setting's read at every curve batch (its confirming read, or a read of its own), as measured
        and in the aimed phase; one more read at B where the curve's value there is more than 10% from the accepted
        figure."""
        key, batch = exact_key(choice.family, choice.order, choice.coverage), self.batch
        if key in self.curves:
            phases = self.curves[key]
        else:
            with status(f"measuring the slowdown curve at batch sizes {', '.join(map(str, self.curve_at))}"):
                phases = self.measure(self.chooser.protector(choice.family, choice.order), choice.coverage,
                                      self.curve_at)
            self.mine(choice).append(aimed(phases[batch], self.phase))
        curve = {b: aimed(v, self.phase) for b, v in phases.items()}
        log("slowdown curve: " + ", ".join(f"{r:.2f}x at batch {b}" for b, r in sorted(curve.items())))
        if abs(curve[batch] / accepted - 1.0) > TOLERANCE:  # the curve disagrees with the accepted figure: read B
            log(f"the curve's {curve[batch]:.2f}x at batch {batch} is more than {TOLERANCE:.0%} from the accepted "
                f"{accepted:.2f}x: reading batch {batch} once more")
            self.read(choice)
        return phases, curve

    def run(self) -> Setting:
        chooser, batch = self.chooser, self.batch
        # the probe: the preset at its largest exact coverage (the same search a plain protect runs)
        probed = choose_coverage(chooser.protector("pieces", self.base.order), self.data)
        probe = chooser.choice("pieces", self.base.order, probed.coverage)
        if probe.coverage <= 0.0:
            raise TaylorMLPError("no channel can be protected token-exactly, so no slowdown is possible; "
                                 "try the default preset or more calibration text")
        choice, accepted = self.rounds_from(probe)
        if not self.within(accepted):
            log(f"closest measured slowdown {accepted:.2f}x{self.at} is outside ±{TOLERANCE:.0%} of the {self.target}x "
                f"asked for (machine noise or an unreachable target); writing it and saying so in the model card")
        same = [r for r in chooser.trace if (r["family"], r["order"]) == (choice.family, choice.order)]
        if (choice.family, choice.order) == ("pieces", self.base.order):
            same = probed.trace + same
        whole = chooser.in_memory(choice.family, choice.order, choice.coverage)
        if not whole:
            need, available = chooser.theta_bytes(choice.family, choice.order, choice.coverage), available_memory() or 0
            log(f"the chosen series coefficients take {need / 1e9:.1f} GB, more than {MEMORY_SHARE:.0%} of the "
                f"{available / 1e9:.1f} GB available: validated layer by layer and written layer by layer; running "
                f"the release needs about that much memory (or accelerate offloading: load_release(..., "
                f"device_map='auto'))")
        confirming = exact_key(choice.family, choice.order, choice.coverage) in self.curves
        phases, curve = self.curve_of(choice, accepted)
        mine = self.mine(choice)
        ratio = float(np.median(mine))  # every read at B of the written setting, the curve's included
        agrees = abs(curve[batch] / ratio - 1.0) <= TOLERANCE
        if not agrees:
            log(f"the curve's {curve[batch]:.2f}x at batch {batch} stays more than {TOLERANCE:.0%} from the median "
                f"of every read there ({ratio:.2f}x): recorded as measured (curve_agrees false)")
        engine = (getattr(self.measure, "engine", None)
                  or {"name": "taylormlp", "mode": "eager", "dtype": str(self.model.dtype)[6:]})
        record = SlowdownRecord(
            target=self.target, measured=ratio, serving_batch=batch, phase=self.phase,
            workload=self.workload.as_dict() if self.workload is not None else None,
            flops_ratio=choice.predicted, bytes_ratio=chooser.work(choice.family, choice.order).bytes_ratio(
                choice.coverage), accepted=accepted, reads=mine, curve_agrees=agrees,
            curve_read="confirming" if confirming else "own", within_tolerance=self.within(ratio), engine=engine,
            prior=self.prior, family=choice.family, machine=machine.describe(), held_in_memory=whole,
            measurements=self.measurements, validations=chooser.trace,
            curve=[{"batch": b, "measured": r, **({"phases": phases[b]} if isinstance(phases[b], dict) else {})}
                   for b, r in sorted(curve.items())])
        return Setting(chooser.protector(choice.family, choice.order), choice.coverage, same, held=whole,
                       slowdown=record)


def choose_slowdown(model, tokenizer, chat: bool, prepared: tuple, opts: ProtectOptions, target: float, measure=None,
                    rounds: int = ROUNDS, serving_batch: int = 1, workload: Workload | None = None) -> Setting:
    """Dial(...).run(): the --slowdown setting and its typed record (see Dial)."""
    return Dial(model, tokenizer, chat, prepared, opts, target, measure, rounds, serving_batch, workload).run()
