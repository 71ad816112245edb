"""The coverage search: the largest share of channels whose release stays token-exact on the validation set.

``largest_accepted`` is a screened bisection over a coverage grid; ``screened_check`` turns a candidate installer and
``decode.validate`` into its check; ``search_coverage`` runs it for a Protector, and ``choose_coverage`` gives step 3
of the protect flow (flow.py) its ``Setting``.  The slowdown search (chooser.SlowdownChooser) uses the same two pieces
with its own installer, and answers with a ``Setting`` too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..common.errors import TaylorMLPError
from ..common.machine import release_memory
from ..common.progress import bar, log
from ..measure.decode import validate
from ..release.slowdown import SlowdownRecord

SCREEN = 0.25  # share of the validation tokens a candidate must pass before the whole set is run (the screen)


def largest_accepted(check, cap: float, steps: int, floor: float = 0.0) -> float:
    """Largest coverage on the grid floor + k·(cap − floor)/2^steps (k = 0..2^steps; floor counts as accepted) that
    `check(coverage, screen=False)` accepts, acceptance assumed to fall as coverage grows: a bisection.

    Screened, because a full validation costs ~4x a screen: `check(coverage, screen=True)` runs only the first few
    validation sequences (a necessary condition), and the bisection runs on screens alone; only its answer is
    validated in full.  If that fails, the failing sequence joins the screen (check's job: validate moves it to the
    front, the screen grows by one) and the bisection resumes below it.  When acceptance does fall monotonically, the
    answer is the one plain bisection with full checks gives (tests/test_search.py), at one full validation plus
    cheap screens in the usual case; either way the answer itself has passed a full validation."""
    n = 2 ** steps

    def at(k: int) -> float:
        return cap if k == n else floor + (cap - floor) * k / n

    good, bad = 0, n + 1  # good: accepted in full; bad: rejected (n + 1: nothing tried yet)
    while bad - good > 1:
        a, b = good, bad
        if b == n + 1:  # the cap itself first: the whole model often passes (default preset)
            if check(at(n), screen=True):
                a = n
            b = n
        while b - a > 1:
            m = (a + b) // 2
            a, b = (m, b) if check(at(m), screen=True) else (a, m)
        if a == good:
            break
        if check(at(a), screen=False):
            good = a
            break  # everything above failed a screen, a necessary condition
        bad = a
    return at(good)


def search_coverage(protector: "Protector", data: "CalibrationData", trace: list) -> float:
    """Largest coverage (bisection on the channel ranking) whose validation is token-exact with every logit
    within the error budget (largest_accepted: screened bisection, one full validation of the answer)."""
    if data is None or not data.validation:
        raise TaylorMLPError("no validation prompts: cannot choose coverage automatically; pass --coverage")
    opts = protector.opts
    steps = bar(desc="coverage search", unit="check")
    check = screened_check(protector.model, data.validation, opts.batch_tokens, opts.error_budget,
                           protector.installed, trace, steps)
    good = largest_accepted(check, 1.0, opts.search_steps)
    steps.close()
    log(f"coverage search: largest accepted coverage {good:.3f} (token-exact, max logit error <= {opts.error_budget})")
    return good


def screened_check(model, validation: list[dict], max_tokens: int, budget: float, install, trace: list,
                   progress=None, extra: dict | None = None):
    """check(coverage, screen) for largest_accepted: inside `install(coverage)` (a context manager that puts the
    candidate in the model and takes it out after), a
    validation within `budget` on the screen or the whole set.  The screen is the first sequences of `validation`
    (most fragile first, see logit_margin) holding a SCREEN share of its tokens; a full check that fails adds its
    failing sequence (moved to the front by validate) to the screen.  Every check is a row of `trace`."""
    lengths = np.cumsum([len(seq["ids"]) for seq in validation])
    size = int(np.searchsorted(lengths, SCREEN * lengths[-1])) + 1 if len(lengths) else 0

    def check(coverage: float, screen: bool = False) -> bool:
        nonlocal size
        with install(coverage):
            result = validate(model, validation, max_tokens, budget=budget, limit=size if screen else None)
        release_memory()
        ok = bool(result["exact"] and result["max_logit_error"] <= budget)
        if not ok and not screen:
            size = min(size + 1, len(validation))
        trace.append({**(extra or {}), "coverage": coverage, "accepted": ok, "screen": screen, **result})
        if progress is not None:
            progress.update()
            progress.set_postfix(coverage=f"{coverage:.3f}", check="screen" if screen else "full", ok=ok)
        return ok

    return check


@dataclass
class Setting:
    """Step 3's answer (flow.run): a protector and the coverage it protects, the validations that led there
    (`trace`), whether its Θ may be held in memory whole (`held`; otherwise each layer's TaylorMLP is built when it
    runs or is written), and for --slowdown what was measured (`slowdown`, release/slowdown.SlowdownRecord)."""

    protector: object
    coverage: float
    trace: list = field(default_factory=list)
    held: bool = True
    slowdown: SlowdownRecord | None = None


def choose_coverage(protector, data) -> Setting:
    """The coverage asked for (opts.coverage), or else the largest token-exact one (search_coverage)."""
    trace: list = []
    opts = protector.opts
    coverage = opts.coverage if opts.coverage is not None else search_coverage(protector, data, trace)
    return Setting(protector, coverage, trace, held=not protector.streamed)
