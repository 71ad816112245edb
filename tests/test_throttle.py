"""`--slowdown X` (issue 10): the joint choice of coverage, order and pieces, with a deterministic "machine".

The injected measurement is the predicted FLOPs ratio itself times a fixed machine factor, so the choice can be
checked exactly: monotone in X, within tolerance, and with the largest coverage among exact candidates."""

from pathlib import Path

import numpy as np
import pytest
import torch

from taylormlp.protection.options import ProtectOptions
from taylormlp.common.errors import TaylorMLPError
from taylormlp.cli import main
from taylormlp.release.sources import load_base
from taylormlp.protection import flow
from taylormlp.protection.throttle import TOLERANCE, SlowdownChooser
from taylormlp.measure.cost import WorkModel

from conftest import FAST

# The tiny model's vocabulary projection dwarfs its MLPs (full coverage adds ~10% FLOPs), so this fake machine
# turns 1 extra FLOPs ratio into 10 extra slowdown: the preset then measures about 2x.
FACTOR = 10.0


def _fake_machine(calls, factor):
    """measure(protector, coverage, batches): the same ratio at every batch size; counts the search's measurements
    (one batch size) in calls["n"] and the recorded curves (several) in calls["curves"]."""
    def measure(protector, coverage, batches):
        work = WorkModel(protector, calls["base_flops"])
        calls["n" if len(batches) == 1 else "curves"] += 1
        return {b: 1.0 + factor * (work.ratio(coverage) - 1.0) for b in batches}
    return measure


def protect_for_slowdown(model, tok, texts, opts, chat, target, measure=None, serving_batch=1):
    """The protect flow with --slowdown (flow.run), installed where its Θ may be held whole: (spec as config.json
    holds it, the slowdown record, the setting)."""
    spec, setting = flow.run(model, tok, texts, opts, chat, slowdown=target, measure=measure,
                             serving_batch=serving_batch)
    spec = flow.install(model, setting, spec) if setting.held else spec.to_dict()
    return spec, setting.slowdown.to_dict(), setting


def _run(tiny_llama_dir, target, factor=FACTOR):
    from taylormlp.measure.cost import flops_per_token

    model, tok, _ = load_base(tiny_llama_dir)
    calls = {"n": 0, "curves": 0, "base_flops": flops_per_token(model)}
    opts = ProtectOptions(preset="default", order=4, **FAST)
    spec, slow, setting = protect_for_slowdown(model, tok, None, opts, True, target,
                                               measure=_fake_machine(calls, factor))
    calls["protector"], calls["setting"] = setting.protector, setting
    return model, spec, slow, calls


@pytest.fixture(scope="module")
def choices(tiny_llama_dir):
    return {x: _run(tiny_llama_dir, x) for x in (1.25, 1.6, 4.0)}


def test_choice_lands_within_tolerance_and_is_recorded(choices):
    for target, (model, spec, slow, calls) in choices.items():
        assert abs(slow["measured"] / target - 1.0) <= TOLERANCE, (target, slow)
        assert slow["target"] == target and slow["flops_ratio"] > 1.0
        assert slow["machine"]["device"] in ("cpu", "cuda")
        assert model.config.taylormlp["slowdown"] == slow
        assert calls["n"] <= 3 and calls["curves"] == 1  # a few full measurements, not a sweep; one curve
        assert slow["serving_batch"] == 1 and [p["batch"] for p in slow["curve"]] == [1, 8, 32]
        assert all(m["batch"] == 1 for m in slow["measurements"])
        assert spec["validation"]["exact"]
        assert type(model.model.layers[0].mlp).__name__ == "TaylorMLP"


def test_choice_is_monotone_in_the_target(choices):
    ordered = [choices[x][2] for x in sorted(choices)]
    ratios = [s["flops_ratio"] for s in ordered]
    assert ratios == sorted(ratios)
    covs = [choices[x][1]["coverage"] for x in sorted(choices)]
    orders = [choices[x][1]["order"] for x in sorted(choices)]
    assert covs[0] <= covs[1] <= covs[2] or orders[2] > orders[0]
    assert covs[0] > 0.0  # even a mild throttle protects something
    assert orders[2] >= orders[0]


def test_small_target_keeps_the_largest_exact_coverage(choices, tiny_llama_dir):
    """Below the preset's cost: no candidate family has an exact setting with more coverage than the chosen one
    whose predicted slowdown still fits the target."""
    from taylormlp.measure.cost import flops_per_token
    from taylormlp.protection.calibration import calibrate

    _, spec, slow, _ = choices[1.25]
    fresh, tok, _ = load_base(tiny_llama_dir)
    base = ProtectOptions(preset="default", order=4, **FAST).resolved()
    data, ranges = calibrate(fresh, tok, None, base, True)
    chooser = SlowdownChooser(fresh, ranges, data, base, flops_per_token(fresh))
    want = 1.0 + (1.25 - 1.0) / FACTOR  # what this fake machine needs in FLOPs
    caps = {}
    for family, order in (("pieces", 4), ("one-piece", 4), ("one-piece", 2)):
        caps[family, order] = cap = chooser.work(family, order).max_coverage(want)
        if cap > spec["coverage"] + 1e-9:  # this family could afford more channels: exactness must have stopped it
            assert not chooser.is_exact(family, order, cap), (family, order, cap, spec["coverage"])
    assert spec["coverage"] > 0.0
    assert spec["coverage"] <= max(caps.values()) + 1e-9  # and the choice itself fits the cost


def _spy_validations(monkeypatch, refuse=lambda family, order, coverage: False):
    """Record every is_exact call (family, order, coverage, screen); `refuse` makes chosen candidates not exact."""
    seen = []
    original = SlowdownChooser.is_exact

    def spy(self, family, order, coverage, screen=False):
        seen.append((family, int(order), round(coverage, 6), screen))
        if coverage > 0 and refuse(family, int(order), coverage):
            if not screen:
                self.exact[(family, int(order), round(coverage, 6))] = False
            return False
        return original(self, family, order, coverage, screen)

    monkeypatch.setattr(SlowdownChooser, "is_exact", spy)
    return seen


def _convex_machine(calls):
    """Slowdown convex in FLOPs: the straight line through the probe overshoots, so the first raised N misses."""
    def measure(protector, coverage, batches):
        calls["n"] += 1
        extra = WorkModel(protector, calls["base_flops"]).ratio(coverage) - 1.0
        return dict.fromkeys(batches, 1.0 + 10.0 * extra + 100.0 * extra ** 2)
    return measure


def test_raised_orders_are_validated_only_when_kept(tiny_llama_dir, monkeypatch):
    """Above the probe, a candidate is timed first and validated only if it is kept: the missed first guess is
    never validated (a validation at high N is the search's dearest step)."""
    from taylormlp.measure.cost import flops_per_token

    seen = _spy_validations(monkeypatch)
    model, tok, _ = load_base(tiny_llama_dir)
    calls = {"n": 0, "base_flops": flops_per_token(model)}
    opts = ProtectOptions(preset="default", order=4, **FAST)
    spec, slow, _ = protect_for_slowdown(model, tok, None, opts, True, 4.4, measure=_convex_machine(calls))
    raised = [m for m in slow["measurements"] if m["order"] > 4]
    assert len(raised) >= 2 and abs(raised[0]["measured"] / 4.4 - 1.0) > TOLERANCE  # the first guess missed
    assert slow["within_tolerance"] and spec["validation"]["exact"] and spec["order"] == raised[-1]["order"]
    validated = {(f, o, c) for f, o, c, screen in seen if o > 4}
    assert validated == {("pieces", spec["order"], round(spec["coverage"], 6))}  # the kept one, and only it


def test_kept_candidate_that_is_not_exact_falls_back_to_its_exact_coverage(tiny_llama_dir, monkeypatch):
    """Should the kept raised-N candidate fail validation, its largest exact coverage below is written, measured
    again (the slowdown recorded is that of what is written) and validated."""
    seen = _spy_validations(monkeypatch, refuse=lambda family, order, coverage: order > 4 and coverage > 0.5)
    model, spec, slow, calls = _run(tiny_llama_dir, 4.0)
    assert spec["order"] > 4 and 0.0 < spec["coverage"] <= 0.5
    assert spec["validation"]["exact"]
    last = slow["measurements"][-1]
    assert (last["order"], last["coverage"]) == (spec["order"], spec["coverage"])
    # reads: the probe, the kept candidate twice, its exact fallback twice (the second at every curve batch: the
    # curve) and once more at most (the next round chose it again); no read of the curve's own
    assert slow["measured"] == last["measured"] and calls["n"] + calls["curves"] <= 6
    assert slow["curve"][0]["measured"] in slow["reads"]
    assert ("pieces", spec["order"], round(spec["coverage"], 6), False) in seen


def test_unreachable_target_is_a_clear_error(tiny_llama_dir):
    with pytest.raises(TaylorMLPError, match="between 1.25 and 16"):
        _run(tiny_llama_dir, 40.0)
    with pytest.raises(TaylorMLPError, match=r"out of reach .* ask for at most"):
        _run(tiny_llama_dir, 16.0, factor=1.0)  # this machine cannot slow the tiny model 16x at any order


def test_slowdown_cli_range(capsys):
    from taylormlp.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["protect", "x", "--out", "y", "--slowdown", "20"])
    assert exc.value.code == 2
    assert "between 1.25 and 16" in capsys.readouterr().err


def test_engine_vllm_refusals(capsys, monkeypatch, tmp_path):
    """--engine vllm needs --slowdown, and vLLM: one-line errors naming the fix, before any work."""
    import taylormlp.serve.vllm_engine as vllm_engine
    from taylormlp.cli import main

    monkeypatch.setattr(vllm_engine.importlib.util, "find_spec", lambda name: None)  # no vLLM here, whatever the venv
    for extra, says in (([], "--engine vllm needs --slowdown X"), (["--slowdown", "4"], "make vllm-setup")):
        assert main(["protect", "smollm2-135m-instruct", "--out", str(tmp_path / "y"), "--engine", "vllm", *extra]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "y").exists()


def test_candidate_too_big_for_memory_is_never_held_whole(choices, tiny_llama_dir, monkeypatch, tmp_path):
    """A high target raises N until Θ outgrows the machine (16x on SmolLM2: ~18 GB on a 23 GB machine): such a
    candidate is validated and written layer by layer and timed on a subset of its layers.  The choice and the
    written release are the same as when everything fits."""
    import taylormlp.protection.chooser as chooser
    from taylormlp.release.directory import ModelTensors, load_release, save_release
    from taylormlp.runtime import ReleaseSpec

    monkeypatch.setattr(chooser, "available_memory", lambda: 1000)  # bytes: less than any raised order's Θ
    model, spec, slow, calls = _run(tiny_llama_dir, 4.0)
    whole_model, whole_spec, whole_slow, _ = choices[4.0]
    assert (spec["coverage"], spec["order"]) == (whole_spec["coverage"], whole_spec["order"]) and spec["order"] > 4
    assert slow["held_in_memory"] is False and whole_slow["held_in_memory"] is True
    assert slow["within_tolerance"] and spec["validation"]["exact"]
    # nothing built is kept: the model is still the original (no spec on its config), and cannot be saved as a release
    assert all(type(layer.mlp).__name__ == "LlamaMLP" for layer in model.model.layers)
    assert getattr(model.config, "taylormlp", None) is None
    with pytest.raises(TaylorMLPError, match="not been protected"):
        save_release(model, tmp_path / "wrong")
    lean = load_release(calls["protector"].write_release(tmp_path / "lean", ReleaseSpec.from_dict(spec),
                                                         ModelTensors(model), torch.float32, None))
    whole = load_release(save_release(whole_model, tmp_path / "whole"))
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        assert torch.equal(lean(ids).logits, whole(ids).logits)


def test_timing_a_subset_of_layers_scales_to_the_whole_model(tiny_llama_dir):
    """measure_ratio on a few layers, scaled by their share of the extra work, gives the ratio of all layers on a
    machine whose decode time is a sum over layers (here: 1 + extra MACs of the installed TaylorMLPs)."""
    from taylormlp.measure.cost import flops_per_token
    from taylormlp.protection.calibration import calibrate
    from taylormlp.measure.throughput import measure_ratios, timed_layers

    model, tok, _ = load_base(tiny_llama_dir)
    base = ProtectOptions(preset="default", order=4, **FAST).resolved()
    data, ranges = calibrate(model, tok, None, base, True)
    protector = SlowdownChooser(model, ranges, data, base, flops_per_token(model)).protector("pieces", 9)
    values, extra = protector.layer_work(1.0)
    installed = []

    def timer(m, batch):
        taylor = [i for i, layer in enumerate(m.model.layers) if type(layer.mlp).__name__ == "TaylorMLP"]
        installed.append(len(taylor))
        return 1.0 + 1e-6 * batch * float(extra[taylor].sum())

    element = torch.empty((), dtype=protector.dtype).element_size()
    full, info = measure_ratios(protector, 1.0, None, (1, 4), budget=None, timer=timer)
    assert info["layers_timed"] == info["layers"] == len(model.model.layers) and "timed_ratio" not in info
    budget = 0.6 * float(values.max()) * element  # room for less than one layer: still one is timed
    part, info = measure_ratios(protector, 1.0, None, (1, 4), budget=budget, timer=timer)
    assert info["layers_timed"] == 1 < info["layers"] and max(installed[-8:]) == 1
    for b in (1, 4):
        assert info["timed_ratio"][b] < part[b] and part[b] == pytest.approx(full[b], rel=1e-12)
        assert full[b] == pytest.approx(1.0 + 1e-6 * b * float(extra.sum()), rel=1e-12)
    assert all(type(layer.mlp).__name__ != "TaylorMLP" for layer in model.model.layers)  # restored
    bytes_ = np.array([5, 5, 5, 5, 5, 5, 5, 5])
    assert timed_layers(bytes_, None) == list(range(8)) == timed_layers(bytes_, 40)
    assert timed_layers(bytes_, 20) == [0, 2, 5, 7] and timed_layers(bytes_, 1) == [0]


def test_available_memory_reads_this_machine():
    """Linux: MemAvailable, in bytes, positive and at most MemTotal (both read here from /proc/meminfo)."""
    from pathlib import Path

    from taylormlp.common.machine import available_memory

    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        assert available_memory() is None
        return
    fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in meminfo.read_text().splitlines()
              if line.split()[-1] == "kB"}
    value = available_memory()
    assert isinstance(value, int) and 0 < value <= fields["MemTotal"]
    assert value % 1024 == 0  # kB in the file, bytes here


@pytest.mark.parametrize("text, expected", [
    ("MemTotal:       16000 kB\nMemFree:         1000 kB\nMemAvailable:    4242 kB\n", 4242 * 1024),
    ("MemTotal:       16000 kB\nMemFree:         1000 kB\n", None),  # an old kernel: no MemAvailable line
    ("MemAvailable: lots kB\n", None),
    ("MemAvailable:\n", None),
    (OSError("no /proc here"), None),
], ids=["available", "no-MemAvailable", "not-a-number", "no-value", "unreadable"])
def test_available_memory_parses_meminfo_and_is_none_where_unknown(monkeypatch, text, expected):
    import io

    import taylormlp.common.machine as machine

    def fake_open(path, *args, **kwargs):
        assert path == "/proc/meminfo"
        if isinstance(text, Exception):
            raise text
        return io.StringIO(text)

    monkeypatch.setattr(machine, "open", fake_open, raising=False)  # found before the builtin by machine's functions
    assert machine.available_memory() == expected


# ---------------------------------------------------------------- --serving-batch: the dial at a batch size

# A machine whose decode time per run is 1 + K[B] · (extra multiply-adds of the TaylorMLPs installed), the extra
# weighing more at larger batches (as on a CPU, where a batch turns a memory-bound step compute-bound).
BATCH_WEIGHT = {1: 1.0, 8: 1.6, 32: 2.2}


def _module_extra(mlp) -> int:
    """Extra multiply-adds per token of one installed TaylorMLP over the MLP it replaces (an oracle independent of
    protector.channel_work: read off the module's own shapes)."""
    return mlp.hidden * ((mlp.order + 1) * mlp.pieces - mlp.protected)


def _spec_extra(spec) -> int:
    return sum(spec["hidden_size"] * ((spec["order"] + 1) * (row.get("pieces") or row["protected"]) - row["protected"])
               for row in spec["layers"] if row["protected"])


def _batch_machine(scale, timed):
    def timer(model, batch):
        extra = sum(_module_extra(layer.mlp) for layer in model.model.layers
                    if type(layer.mlp).__name__ == "TaylorMLP")
        timed.append(batch)
        return 1.0 + scale * BATCH_WEIGHT[batch] * extra
    return timer


@pytest.fixture(scope="module")
def batch_choices(tiny_llama_dir):
    """protect_for_slowdown at serving batch 1 and 32 for one target, timed by measure_ratios with an injected
    per-batch timer: {B: (spec, slowdown record, batches timed)}."""
    from taylormlp.measure.cost import flops_per_token
    from taylormlp.measure.throughput import measure_ratios

    out = {}
    for batch in (1, 32):
        model, tok, _ = load_base(tiny_llama_dir)
        scale = 2.0 * FACTOR / flops_per_token(model)  # at batch 1: the fake machine above (10 per FLOPs ratio)
        timed = []
        timer = _batch_machine(scale, timed)

        def measure(protector, coverage, batches):
            return measure_ratios(protector, coverage, None, batches, repeats=1, timer=timer)[0]
        opts = ProtectOptions(preset="default", order=4, **FAST)
        spec, slow, _ = protect_for_slowdown(model, tok, None, opts, True, 3.0, measure=measure, serving_batch=batch)
        out[batch] = (spec, slow, timed, scale)
    return out


def test_serving_batch_meets_the_target_at_that_batch(batch_choices):
    truth = {}
    for batch, (spec, slow, timed, scale) in batch_choices.items():
        extra = _spec_extra(spec)
        truth[batch] = {b: 1.0 + scale * w * extra for b, w in BATCH_WEIGHT.items()}  # this machine's ratios
        assert slow["serving_batch"] == batch
        assert abs(truth[batch][batch] / 3.0 - 1.0) <= TOLERANCE, (batch, truth[batch])  # met at batch B
        assert slow["measured"] == pytest.approx(truth[batch][batch], rel=1e-9)
        assert all(m["batch"] == batch for m in slow["measurements"])
        # the curve: batch 1, 8, 32 (B among them), each this machine's ratio for the written release
        assert [p["batch"] for p in slow["curve"]] == [1, 8, 32]
        for point in slow["curve"]:
            assert point["measured"] == pytest.approx(truth[batch][point["batch"]], rel=1e-9)
        assert spec["validation"]["exact"]
    # at batch 32 the same slowdown costs less series work, and the batch-1 release pays more than 3x at batch 32
    assert _spec_extra(batch_choices[32][0]) < _spec_extra(batch_choices[1][0])
    assert truth[1][32] > 3.0 * (1 + TOLERANCE)
    # the search timed only the serving batch; the curve, once, every batch of it
    for batch in (1, 32):  # the curve: warm-up + one round, of the original and the release, at each batch
        timed = batch_choices[batch][2]
        assert timed.count(8) == 4 and timed.count(32 if batch == 1 else 1) == 4


def test_curve_flops_and_bytes_ratios_land_in_config_and_card(batch_choices, tiny_llama_dir):
    from taylormlp.release.card import model_card

    spec, slow, _, _ = batch_choices[32]
    assert spec["slowdown"] == slow  # the config's taylormlp section carries the record
    # bytes ratio: one extra parameter value read per extra multiply-add, over the original's parameters a step
    # reads (all but the input embeddings, unless the output layer shares them)
    original, _, _ = load_base(tiny_llama_dir)
    tied = original.config.tie_word_embeddings
    base_bytes = 4 * sum(p.numel() for name, p in original.named_parameters() if tied or "embed_tokens" not in name)
    assert slow["bytes_ratio"] == pytest.approx(1.0 + 4 * _spec_extra(spec) / base_bytes, rel=1e-12)
    assert slow["flops_ratio"] > 1.0
    card = model_card(spec, slowdown=slow)
    assert "| requested decode slowdown | 3.0x at batch 32" in card
    assert f"| measured decode slowdown | {slow['measured']:.2f}x at batch 32" in card
    curve = ", ".join(f"{p['batch']}: {p['measured']:.2f}x" for p in slow["curve"])
    assert curve in card and f"{slow['bytes_ratio']:.2f}x" in card and f"{slow['flops_ratio']:.2f}x" in card
    machine = slow["machine"]
    assert (machine.get("gpu") or machine["cpu"]) in card


# ---------------------------------------------------------------- repeated reads: a choice is accepted on two

def test_every_accepted_choice_rests_on_repeated_reads(choices):
    """The written setting was read at least CONFIRM_READS times at B, its confirming read at every curve batch (the
    curve: no read of its own); the figure recorded is the median of every read at B, and the curve agrees."""
    from taylormlp.protection.throttle import CONFIRM_READS

    for target, (_, spec, slow, _) in choices.items():
        written = [m["measured"] for m in slow["measurements"]
                   if (m["order"], m["coverage"]) == (spec["order"], spec["coverage"])]
        assert len(written) >= CONFIRM_READS, (target, slow["measurements"])
        assert slow["reads"] == written and slow["curve_read"] == "confirming"
        at_b = next(p["measured"] for p in slow["curve"] if p["batch"] == slow["serving_batch"])
        assert at_b == written[CONFIRM_READS - 1]
        assert slow["measured"] == pytest.approx(float(np.median(slow["reads"])))
        assert slow["curve_agrees"] and slow["within_tolerance"]
        assert slow["engine"]["name"] == "taylormlp"  # an injected measure without an engine: our runtime


def _scripted(calls, read, curve=None, after=None):
    """A fake machine (truth: the one above): the n-th search read of a setting is read(truth, n), the curve returns
    curve(truth) where given, the reads after the curve after(truth) where given."""
    seen: dict = {}

    def measure(protector, coverage, batches):
        truth = 1.0 + FACTOR * (WorkModel(protector, calls["base_flops"]).ratio(coverage) - 1.0)
        if len(batches) > 1:
            calls["curves"] += 1
            return dict.fromkeys(batches, curve(truth) if curve else truth)
        calls["n"] += 1
        if calls["curves"] and after:
            return dict.fromkeys(batches, after(truth))
        key = (id(protector), round(coverage, 6))
        seen[key] = seen.get(key, -1) + 1
        return dict.fromkeys(batches, read(truth, seen[key]))
    return measure


def _run_scripted(tiny_llama_dir, target, measure_of):
    from taylormlp.measure.cost import flops_per_token

    model, tok, _ = load_base(tiny_llama_dir)
    calls = {"n": 0, "curves": 0, "base_flops": flops_per_token(model)}
    opts = ProtectOptions(preset="default", order=4, **FAST)
    _, slow, setting = protect_for_slowdown(model, tok, None, opts, True, target, measure=measure_of(calls))
    return slow, WorkModel(setting.protector, calls["base_flops"]), calls


def test_a_lucky_read_is_not_accepted_alone(tiny_llama_dir):
    """The preset truly measures ~2x on this machine; the first read of every setting says exactly 1.6x (the
    target).  The probe's confirming read (its truth) takes the median out of tolerance, so the dial moves on; the
    figure it writes is the machine's, not luck's."""
    slow, work, calls = _run_scripted(tiny_llama_dir, 1.6, lambda calls: _scripted(
        calls, lambda truth, n: 1.6 if n == 0 else truth))
    probe = slow["measurements"][0]
    probe_reads = [m["measured"] for m in slow["measurements"]
                   if (m["order"], m["coverage"]) == (probe["order"], probe["coverage"])]
    assert probe_reads[0] == 1.6 and probe_reads[1] > 1.6 * (1 + 2 * TOLERANCE)  # lucky, then the truth
    written = slow["measurements"][-1]
    assert (written["order"], written["coverage"]) != (probe["order"], probe["coverage"])  # the probe was not kept
    assert len(slow["reads"]) >= 2 and slow["accepted"] != 1.6 and slow["curve_agrees"]
    truth = 1.0 + FACTOR * (work.ratio(written["coverage"]) - 1.0)  # honest: the record says what the machine did
    assert truth in slow["reads"] and slow["measured"] == pytest.approx(float(np.median(slow["reads"])))
    assert slow["within_tolerance"] is (abs(slow["measured"] / 1.6 - 1) <= TOLERANCE)


@pytest.mark.parametrize("curve, after, measured, agrees, within", [
    (1.0, 1.3, 1.3, False, False), (1.0, 1.0, 1.0, True, True), (1.25, None, 1.275, True, False)],
    ids=["re-read-as-accepted", "re-read-as-curve", "no-re-read"])
def test_a_curve_of_its_own_that_disagrees_is_read_again(tiny_llama_dir, curve, after, measured, agrees, within):
    """One round, whose read says 1.3x the target: never confirmed, so the curve is read on its own.  A curve more
    than 10% from the accepted figure at B gets B read once more; the figure recorded is the median of every read at
    B, and within_tolerance and curve_agrees say what they show."""
    from taylormlp.measure.cost import flops_per_token

    target = 2.0
    model, tok, _ = load_base(tiny_llama_dir)
    calls = {"n": 0, "curves": 0, "base_flops": flops_per_token(model)}
    measure = _scripted(calls, lambda truth, n: 1.3 * target, curve=lambda truth: curve * target,
                        after=(lambda truth: after * target) if after else None)
    _, setting = flow.run(model, tok, None, ProtectOptions(preset="default", order=4, **FAST), True, slowdown=target,
                          measure=measure, rounds=1)
    slow = setting.slowdown.to_dict()
    assert calls["curves"] == 1 and slow["accepted"] == 1.3 * target and slow["curve_read"] == "own"
    assert slow["reads"] == [1.3 * target, curve * target] + ([after * target] if after else [])
    assert calls["n"] == (2 if after else 1)
    assert slow["measured"] == pytest.approx(measured * target)
    assert slow["curve_agrees"] is agrees and slow["within_tolerance"] is within


class _PricedMachine:
    """An engine that prices the series at its FLOPs (prior 1): every read is the FLOPs ratio itself."""

    prior = 1.0

    def __init__(self, calls):
        self.calls = calls

    def __call__(self, protector, coverage, batches):
        self.calls["reads"].append((protector.opts.order, round(coverage, 6), tuple(batches)))
        return dict.fromkeys(batches, WorkModel(protector, self.calls["base_flops"]).ratio(coverage))


def test_an_engine_prior_replaces_the_probe_read(tiny_llama_dir):
    """A measure with a prior (EngineDial) is not asked for the probe: the first read is the setting the prior picks,
    which on a machine that keeps the prior is accepted on it and its confirming read, the curve."""
    from taylormlp.measure.cost import flops_per_token

    model, tok, _ = load_base(tiny_llama_dir)
    calls = {"reads": [], "base_flops": flops_per_token(model)}
    _, setting = flow.run(model, tok, None, ProtectOptions(preset="default", order=4, **FAST), True, slowdown=1.25,
                          measure=_PricedMachine(calls))
    slow = setting.slowdown.to_dict()
    assert slow["prior"] == 1.0 and slow["within_tolerance"] and slow["curve_read"] == "confirming"
    assert len(calls["reads"]) == 2 and calls["reads"][0][2] == (1,) and calls["reads"][1][2] == (1, 8, 32)
    # one setting, read twice; not the probe (the preset at its base order 4, about 1.1x FLOPs here): more orders
    assert calls["reads"][0][:2] == calls["reads"][1][:2] and calls["reads"][0][0] > 4
    assert abs(slow["measurements"][0]["measured"] / 1.25 - 1.0) <= TOLERANCE


@pytest.mark.parametrize("rounds", [1, 2])
def test_rounds_caps_the_settings_measured(tiny_llama_dir, rounds):
    """--rounds R: at most R settings are measured (the probe counts); the closest is written and said to miss."""
    from taylormlp.measure.cost import flops_per_token

    model, tok, _ = load_base(tiny_llama_dir)
    calls = {"n": 0, "curves": 0, "base_flops": flops_per_token(model)}
    opts = ProtectOptions(preset="default", order=4, **FAST)
    reads = iter([3.0, 1.5, 1.5, 1.5, 1.5, 1.5])  # far from 2x every time: every round misses

    def measure(protector, coverage, batches):
        calls["n"] += 1
        ratio = next(reads) if len(batches) == 1 else 1.5
        return dict.fromkeys(batches, ratio)

    _, setting = flow.run(model, tok, None, opts, True, slowdown=2.0, measure=measure, rounds=rounds)
    measured = {(m["family"], m["order"], m["coverage"]) for m in setting.slowdown.measurements}
    assert len(measured) == rounds and setting.slowdown.within_tolerance is False


def test_rounds_reaches_the_dial_from_the_command_line(tiny_llama_dir, tmp_path, monkeypatch):
    seen = {}

    def choose_slowdown(*args, rounds, **kwargs):
        seen["rounds"] = rounds
        raise TaylorMLPError("stop here")

    monkeypatch.setattr(flow, "choose_slowdown", choose_slowdown)
    assert main(["protect", str(tiny_llama_dir), "--out", str(tmp_path / "r"), "--slowdown", "2", "--rounds", "5",
                 "--calibration-samples", "2"]) == 2
    assert seen == {"rounds": 5} and not (tmp_path / "r").exists()


class _FakeEngine:
    """An engine of measure/engines.py whose sessions answer at once (the release 2 s, the original 1 s) and log
    their starts and stops in `events`: nothing is timed here."""

    name, in_process, prior = "fake", False, 1.0

    def __init__(self, events):
        self.events = events

    def require(self):
        self.events.append(("require",))

    def start(self, model_dir, log_path, dtype="auto", max_model_len=512, impl="auto", eager=False):
        events, name = self.events, Path(log_path).stem

        class Session:
            info = {"version": "0", "model_class": name}

            def timed_batch(self, prompts, tokens):
                seconds = 2.0 if name.startswith("candidate") else 1.0
                return {"prefill_s": seconds, "decode_s": seconds}

            def close(self):
                events.append(("stop", name))

        events.append(("start", name))
        return Session()


def test_engine_dial_leaves_no_temporary_directory(tmp_path):
    """The dial's own work directory (engine logs, candidates) goes with close(); one the caller gave stays."""
    from taylormlp.protection.engine_dial import EngineDial

    events = []
    own = EngineDial(_FakeEngine(events), tmp_path, None, [1, 2])
    given = EngineDial(_FakeEngine(events), tmp_path, None, [1, 2], workdir=tmp_path / "given")
    assert own.workdir.is_dir() and given.workdir.is_dir() and events == [("require",)] * 2  # checked at once
    assert own.prior == 1.0  # the engine's
    own.close()
    given.close()
    assert not own.workdir.exists() and given.workdir.is_dir()


class _Spec(dict):
    def to_dict(self):
        return dict(self)


class _Candidate:  # the Protector's two methods the dial writes a candidate with
    def __init__(self, events, tag):
        self.model, self.events, self.tag = torch.nn.Linear(1, 1), events, tag

    def release_spec(self, coverage, record):
        return _Spec(coverage=coverage, tag=self.tag)

    def write_release(self, out, spec, tensors, dtype, tokenizer, force=False):
        self.events.append(("write", spec["coverage"]))
        out.mkdir(parents=True, exist_ok=force)


def _one_round(sessions, batches, tokens, repeats, desc):
    return {(b, name): [s.timed_batch(batches[b], tokens)] for b in batches for name, s in sessions.items()}


def test_engine_dial_reads_a_setting_again_on_fresh_engines(monkeypatch, tmp_path):
    """A setting read again (confirming read, curve) gets both engines started afresh on the same candidate files;
    a new setting writes new files and keeps the original's engine."""
    from taylormlp.protection import engine_dial

    events = []
    monkeypatch.setenv("TAYLORMLP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(engine_dial, "timed_sessions", _one_round)
    dial = engine_dial.EngineDial(_FakeEngine(events), tmp_path, None, [1], workdir=tmp_path / "w")
    a, b = _Candidate(events, "a"), _Candidate(events, "b")
    events.clear()
    twice = {"prefill": 2.0, "decode": 2.0, "request": 2.0}
    assert dial(a, 0.5, (4,)) == {4: twice}
    assert events == [("start", "original"), ("write", 0.5), ("start", "candidate-1")]
    assert dial.engine["name"] == "fake" and dial.engine["release_class"] == "candidate-1"
    events.clear()
    assert dial(a, 0.5, (1, 4)) == {1: twice, 4: twice}
    assert events == [("stop", "candidate-1"), ("stop", "original"), ("start", "original"), ("start", "candidate-1")]
    events.clear()
    dial(b, 0.5, (4,))
    assert events == [("stop", "candidate-1"), ("write", 0.5), ("start", "candidate-2")]
    path_a = engine_dial.candidate_path(tmp_path, {"coverage": 0.5, "tag": "a"})
    path_b = engine_dial.candidate_path(tmp_path, {"coverage": 0.5, "tag": "b"})
    assert path_a != path_b and not path_a.exists() and (path_b / "release").is_dir()
    dial.close()
    assert not path_b.exists()


def test_a_candidate_is_written_where_its_setting_was_written_before(monkeypatch, tmp_path):
    """The same setting of the same original gets the same path, run after run (an engine's compile cache keyed by
    path and configuration finds it); while another dial holds that path, a private one in the work directory."""
    from taylormlp.protection import engine_dial

    events = []
    monkeypatch.setenv("TAYLORMLP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(engine_dial, "timed_sessions", _one_round)
    stable = engine_dial.candidate_path(tmp_path / "src", {"coverage": 0.5, "tag": "a"})
    assert stable.parent == tmp_path / "cache" / "dial-candidates"
    assert stable == engine_dial.candidate_path(tmp_path / "src", {"tag": "a", "coverage": 0.5})  # order-free
    assert stable != engine_dial.candidate_path(tmp_path / "other", {"coverage": 0.5, "tag": "a"})
    first = engine_dial.EngineDial(_FakeEngine(events), tmp_path / "src", None, [1], workdir=tmp_path / "w1")
    first(_Candidate(events, "a"), 0.5, (1,))
    assert (stable / "release").is_dir()
    second = engine_dial.EngineDial(_FakeEngine(events), tmp_path / "src", None, [1], workdir=tmp_path / "w2")
    second(_Candidate(events, "a"), 0.5, (1,))  # the first holds the path: a private candidate
    assert (tmp_path / "w2" / "candidate-1" / "release").is_dir()
    first.close()
    second.close()
    assert not stable.exists() and not (tmp_path / "w2" / "candidate-1").exists()
    third = engine_dial.EngineDial(_FakeEngine(events), tmp_path / "src", None, [1], workdir=tmp_path / "w3")
    third(_Candidate(events, "a"), 0.5, (1,))  # free again: the stable path
    assert (stable / "release").is_dir()
    third.close()


def test_a_round_that_chooses_the_same_setting_reads_it_again(tiny_llama_dir, monkeypatch):
    """When the refitted line points at the setting just read, the round reads it once more (instead of ending the
    dial): here the probe reads 3.0x, 1.5x, then 1.6x, and is accepted at 1.6x on the median of its three reads."""
    model, tok, _ = load_base(tiny_llama_dir)
    monkeypatch.setattr(SlowdownChooser, "choose", lambda self, target, line, probe: probe)
    reads = iter([3.0, 1.5, 1.6])

    def measure(protector, coverage, batches):
        return dict.fromkeys(batches, next(reads) if len(batches) == 1 else 1.6)

    opts = ProtectOptions(preset="default", order=4, **FAST)
    _, setting = flow.run(model, tok, None, opts, True, slowdown=1.6, measure=measure, rounds=5)
    slow = setting.slowdown.to_dict()
    assert [m["measured"] for m in slow["measurements"]] == [3.0, 1.5, 1.6]
    assert slow["accepted"] == 1.6 and slow["within_tolerance"] and slow["reads"] == [3.0, 1.5, 1.6, 1.6]
