"""search.largest_accepted: the screened bisection gives plain bisection's answer with one full validation when
the screen is already decisive, and stays right when the screen lets candidates through that fail in full."""

from hypothesis import given, settings
from hypothesis import strategies as st

from taylormlp.protection.search import largest_accepted


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


class FakeValidation:
    """Stands in for decode.validate: accepts a coverage iff it is at most `threshold` and every logit error
    `error(coverage)` is within the budget; records the screen size (limit) each call sees."""

    def __init__(self, threshold: float, error=lambda c: 0.0):
        self.threshold, self.error, self.limits = threshold, error, []

    def __call__(self, model, validation, max_tokens, budget=None, limit=None):
        self.limits.append(limit)
        return {"exact": self.coverage <= self.threshold, "max_logit_error": self.error(self.coverage),
                "tokens_matched": 1, "tokens": 1}


def _screened(monkeypatch, fake, lengths=(10, 10, 10, 10, 10, 10, 10, 10), extra=None):
    import contextlib

    import taylormlp.protection.search as search

    monkeypatch.setattr(search, "validate", fake)
    installed = []

    @contextlib.contextmanager
    def install(coverage):
        fake.coverage = coverage
        installed.append(("in", coverage))
        yield
        installed.append(("out", coverage))

    trace = []
    validation = [{"ids": [0] * n} for n in lengths]
    return search.screened_check(None, validation, 64, 0.1, install, trace, extra=extra), trace, installed


def test_screened_check_installs_around_each_validation_and_records_it(monkeypatch):
    fake = FakeValidation(0.5)
    check, trace, installed = _screened(monkeypatch, fake, extra={"family": "pieces"})
    assert check(0.25, screen=True) is True and check(0.75, screen=False) is False
    assert installed == [("in", 0.25), ("out", 0.25), ("in", 0.75), ("out", 0.75)]
    assert [(r["coverage"], r["accepted"], r["screen"], r["family"]) for r in trace] == [
        (0.25, True, True, "pieces"), (0.75, False, False, "pieces")]


def test_screen_holds_a_quarter_of_the_tokens_and_grows_after_a_failed_full_check(monkeypatch):
    fake = FakeValidation(0.5)
    check, _, _ = _screened(monkeypatch, fake)  # 8 sequences of 10 tokens: the first 2 hold 25% of the 80
    check(0.1, screen=True)
    check(0.1, screen=False)  # a full check that passes: the screen stays
    check(0.1, screen=True)
    check(0.9, screen=False)  # a full check that fails: one more sequence in the screen
    check(0.1, screen=True)
    check(0.9, screen=True)  # a failed screen does not grow it
    check(0.1, screen=True)
    assert fake.limits == [2, None, 2, None, 3, 3, 3]


def test_screen_never_exceeds_the_validation_set(monkeypatch):
    fake = FakeValidation(0.0)
    check, _, _ = _screened(monkeypatch, fake, lengths=(10, 10))
    for _ in range(4):
        check(0.5, screen=False)
    check(0.5, screen=True)
    assert fake.limits[-1] == 2


def test_an_error_over_budget_rejects_an_exact_candidate(monkeypatch):
    fake = FakeValidation(1.0, error=lambda c: 0.2 if c > 0.5 else 0.1)  # budget 0.1: at it passes, over fails
    check, trace, _ = _screened(monkeypatch, fake)
    assert check(0.5, screen=False) is True
    assert check(0.6, screen=False) is False and trace[-1]["max_logit_error"] == 0.2


def test_grid_between_floor_and_cap():
    assert largest_accepted(Validation(0.55, []), 0.8, 2, floor=0.2) == 0.5  # grid 0.2, 0.35, 0.5, 0.65, 0.8
    cap, floor = 0.3, 0.1  # 0.1 + (0.3 - 0.1) is 0.30000000000000004 in floats: the cap is returned as given
    assert largest_accepted(Validation(1.0, []), cap, 3, floor=floor) == cap


class Recorder:
    """Records decode.validate's arguments, and what a progress bar is told."""

    def __init__(self):
        self.calls, self.postfix, self.updates = [], [], 0

    def __call__(self, model, validation, max_tokens, budget=None, limit=None):
        self.calls.append((model, validation, max_tokens, budget, limit))
        return {"exact": True, "max_logit_error": 0.0, "tokens_matched": 1, "tokens": 1}

    def update(self):
        self.updates += 1

    def set_postfix(self, **kw):
        self.postfix.append(kw)


def test_screened_check_passes_its_arguments_to_validate_and_reports_progress(monkeypatch):
    import contextlib

    import taylormlp.protection.search as search

    rec = Recorder()
    monkeypatch.setattr(search, "validate", rec)
    validation = [{"ids": [0] * n} for n in (10, 10, 10, 70)]  # 25% of 100 tokens: the first 3 sequences
    model = object()
    check = search.screened_check(model, validation, 64, 0.125, lambda c: contextlib.nullcontext(), [], rec)
    assert check(0.5) is True  # a full check unless asked for a screen
    assert check(0.25, screen=True) is True
    assert rec.calls == [(model, validation, 64, 0.125, None), (model, validation, 64, 0.125, 3)]
    assert rec.updates == 2
    assert rec.postfix == [{"coverage": "0.500", "check": "full", "ok": True},
                           {"coverage": "0.250", "check": "screen", "ok": True}]


def test_screened_check_of_an_empty_validation_set_screens_nothing(monkeypatch):
    import contextlib

    import taylormlp.protection.search as search

    rec = Recorder()
    monkeypatch.setattr(search, "validate", rec)
    check = search.screened_check(None, [], 8, 0.1, lambda c: contextlib.nullcontext(), [])
    check(0.5, screen=True)
    assert rec.calls[-1][-1] == 0


def test_search_coverage_runs_the_screened_bisection_on_the_protector(monkeypatch):
    import contextlib
    from types import SimpleNamespace

    import pytest

    import taylormlp.protection.search as search
    from taylormlp.common.errors import TaylorMLPError

    fake = FakeValidation(0.3)
    seen = []

    def validate(model, validation, max_tokens, budget=None, limit=None):
        seen.append((model, max_tokens, budget))
        return fake(model, validation, max_tokens, budget, limit)

    monkeypatch.setattr(search, "validate", validate)
    progress = Recorder()
    monkeypatch.setattr(search, "bar", lambda **kw: progress.postfix.append(kw) or progress)
    progress.close = lambda: progress.postfix.append("closed")
    installed = []

    @contextlib.contextmanager
    def install(coverage):
        fake.coverage = coverage
        installed.append(coverage)
        yield

    protector = SimpleNamespace(model=object(), installed=install,
                                opts=SimpleNamespace(batch_tokens=64, error_budget=0.1, search_steps=9))
    data = SimpleNamespace(validation=[{"ids": [0] * 10} for _ in range(8)])
    trace = []
    assert search.search_coverage(protector, data, trace) == 153 / 512  # largest multiple of 1/512 not above 0.3
    assert installed[0] == 1.0 and len(trace) == len(installed) == 11  # the top, 9 halvings, one full check
    assert [row["screen"] for row in trace].count(False) == 1
    assert set(seen) == {(protector.model, 64, 0.1)}  # the protector's model, batch size and budget
    assert progress.postfix[0] == {"desc": "coverage search", "unit": "check"} and progress.postfix[-1] == "closed"
    assert progress.updates == 11  # every check moved the bar
    for empty in (None, SimpleNamespace(validation=[])):
        with pytest.raises(TaylorMLPError, match="no validation prompts"):
            search.search_coverage(protector, empty, [])


def test_choose_coverage_gives_the_asked_coverage_or_the_search_answer(monkeypatch):
    """Step 3 of the protect flow: a coverage given in the options is taken as it is, with no search and an empty
    trace; otherwise the search runs and its answer and trace come back.  Held whole unless the protector streams."""
    from types import SimpleNamespace

    import taylormlp.protection.search as search

    calls = []

    def fake_search(protector, data, trace):
        calls.append((protector, data))
        trace.append({"coverage": 0.25, "screen": False})
        return 0.25

    monkeypatch.setattr(search, "search_coverage", fake_search)
    data = SimpleNamespace(validation=[{}])
    given_ = SimpleNamespace(opts=SimpleNamespace(coverage=0.5), streamed=False)
    setting = search.choose_coverage(given_, data)
    assert (setting.protector, setting.coverage, setting.trace, setting.held, setting.slowdown) == (
        given_, 0.5, [], True, None)
    assert calls == []
    searched = SimpleNamespace(opts=SimpleNamespace(coverage=None), streamed=True)
    setting = search.choose_coverage(searched, data)
    assert calls == [(searched, data)]
    assert (setting.protector, setting.coverage, setting.held) == (searched, 0.25, False)
    assert setting.trace == [{"coverage": 0.25, "screen": False}]
    assert search.Setting(searched, 0.1).trace == [] and search.Setting(searched, 0.1).held is True
