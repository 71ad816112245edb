"""search.largest_accepted: the screened bisection gives plain bisection's answer with one full validation when
the screen is already decisive, and stays right when the screen lets candidates through that fail in full."""

from hypothesis import given, settings
from hypothesis import strategies as st

from taylormlp.search import largest_accepted


def plain_bisection(accept, steps: int) -> float:
    """The search as it was before screening: the top first, then bisection with full checks only."""
    if accept(1.0):
        return 1.0
    good, bad = 0.0, 1.0
    for _ in range(steps):
        mid = (good + bad) / 2.0
        good, bad = (mid, bad) if accept(mid) else (good, mid)
    return good


class Validation:
    """Acceptance by a threshold (accept iff coverage <= T); the screen is looser (thresholds screens[0] >= screens[1]
    >= ... >= T), tightening by one step after every failed full check, as a screen that gains the failing sequence."""

    def __init__(self, threshold: float, screens: list[float]):
        self.threshold, self.screens, self.level = threshold, sorted(screens, reverse=True), 0
        self.full = self.screened = 0

    def __call__(self, coverage: float, screen: bool) -> bool:
        if screen:
            self.screened += 1
            limit = self.screens[self.level] if self.level < len(self.screens) else self.threshold
            return coverage <= max(limit, self.threshold)
        self.full += 1
        ok = coverage <= self.threshold
        if not ok:
            self.level += 1
        return ok


@settings(max_examples=300, deadline=None)
@given(threshold=st.floats(0.0, 1.2), loose=st.lists(st.floats(0.0, 1.2), max_size=4), steps=st.integers(1, 9))
def test_same_answer_as_plain_bisection(threshold, loose, steps):
    v = Validation(threshold, loose)
    got = largest_accepted(v, 1.0, steps)
    assert got == plain_bisection(lambda c: c <= threshold, steps)
    assert v.full <= len(loose) + 1  # one full check, plus one per screen that let a failing candidate through


def test_decisive_screen_needs_one_full_validation():
    v = Validation(0.3, [])
    assert largest_accepted(v, 1.0, 9) == 153 / 512  # largest multiple of 1/512 not above 0.3
    assert v.full == 1 and v.screened == 10  # the top, then 9 halvings


def test_nothing_accepted_needs_no_full_validation():
    v = Validation(-1.0, [])
    assert largest_accepted(v, 1.0, 5) == 0.0
    assert v.full == 0


def test_cap_and_floor():
    v = Validation(0.45, [])
    assert largest_accepted(v, 0.5, 3) == 0.4375  # grid 0, 1/16, ..., 1/2
    assert largest_accepted(Validation(1.0, []), 0.5, 3) == 0.5  # the cap itself
    assert largest_accepted(Validation(0.1, []), 0.8, 2, floor=0.2) == 0.2  # floor counts as accepted
