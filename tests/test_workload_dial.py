"""`protect --slowdown X --workload P:G`: the dial aims at the whole request (prefill + decode) on P-token prompts,
and the record and card carry the workload and the three slowdowns.  A deterministic fake machine: per phase the
ratio is 1 + weight · factor · (FLOPs ratio − 1), the prefill weighing 3, the decode 1, the request 2."""

import pytest

from conftest import FAST

from taylormlp.cli import main
from taylormlp.common.errors import TaylorMLPError
from taylormlp.measure import throughput
from taylormlp.measure.cost import WorkModel, flops_per_token
from taylormlp.measure.workload import Workload
from taylormlp.protection import flow, throttle
from taylormlp.protection.options import ProtectOptions
from taylormlp.release.card import engine_words, model_card
from taylormlp.release.sources import load_base

WEIGHTS = {"prefill": 3.0, "decode": 1.0, "request": 2.0}
FACTOR = 10.0


def _phase_machine(base_flops, batches_seen):
    def measure(protector, coverage, batches):
        batches_seen.append(tuple(batches))
        extra = WorkModel(protector, base_flops).ratio(coverage) - 1.0
        return {b: {phase: 1.0 + w * FACTOR * extra for phase, w in WEIGHTS.items()} for b in batches}
    return measure


@pytest.fixture(scope="module")
def dialed(tiny_llama_dir):
    """{workload or None: (record, batches measured)} for target 3.0 at serving batch 4."""
    out = {}
    for workload in (Workload(32, 8), None):
        model, tok, _ = load_base(tiny_llama_dir)
        seen = []
        opts = ProtectOptions(preset="default", order=4, **FAST)
        _, setting = flow.run(model, tok, None, opts, True, slowdown=3.0, serving_batch=4, workload=workload,
                              measure=_phase_machine(flops_per_token(model), seen))
        out[workload] = (setting.slowdown.to_dict(), seen)
    return out


def test_the_workload_dial_aims_at_the_whole_request(dialed):
    record, seen = dialed[Workload(32, 8)]
    assert record["phase"] == "request" and record["workload"] == {"prompt_tokens": 32, "new_tokens": 8}
    assert abs(record["measured"] / 3.0 - 1.0) <= throttle.TOLERANCE
    curve = {p["batch"]: p for p in record["curve"]}
    assert sorted(curve) == [1, 4] and seen[-1] == (1, 4)  # the curve at batch 1 and B only
    phases = curve[4]["phases"]
    assert phases["request"] == pytest.approx(curve[4]["measured"])  # the aimed phase is the request's
    assert phases["decode"] < phases["request"] < phases["prefill"]
    plain, _ = dialed[None]  # without a workload: the same machine, aimed at decode
    assert plain["phase"] == "decode" and "workload" not in plain
    assert sorted(p["batch"] for p in plain["curve"]) == [1, 4, 8, 32]
    assert plain["curve"][1]["phases"]["decode"] == pytest.approx(plain["curve"][1]["measured"])
    # decode at half the request's weight: the decode dial protects more work to reach the same 3x
    assert plain["flops_ratio"] > record["flops_ratio"]


def test_the_card_names_the_workload_and_the_three_slowdowns(dialed, tiny_llama_dir):
    record, _ = dialed[Workload(32, 8)]
    card = model_card({"hidden_size": 32, "layers": [], "order": 4, "basis": "chebyshev", "coverage": 1.0},
                      slowdown=record)
    assert "| requested whole-request slowdown | 3.0x at batch 4 on workload 32:8 (4 distinct prompts of 32" in card
    assert f"| measured whole-request slowdown | {record['measured']:.2f}x at batch 4" in card
    for point in record["curve"]:
        ph = point["phases"]
        assert (f"| prefill / decode / request slowdown at batch {point['batch']} | {ph['prefill']:.2f}x / "
                f"{ph['decode']:.2f}x / {ph['request']:.2f}x") in card


def test_the_default_measure_times_the_workloads_prompts(tiny_llama_dir, monkeypatch):
    """Without an injected measure the dial times B distinct prompts of P tokens and G − 1 decode steps
    (throughput.measure_ratios, here spied on)."""
    calls = []

    def spy(protector, coverage, ids, batches, new_tokens=24, budget=None, **kw):
        calls.append((tuple(ids.shape), new_tokens, tuple(batches)))
        ratio = 1.0 + 20.0 * (WorkModel(protector, base).ratio(coverage) - 1.0)
        return {b: {"prefill": ratio, "decode": ratio, "request": ratio} for b in batches}, {}

    monkeypatch.setattr(throttle, "measure_ratios", spy)
    model, tok, _ = load_base(tiny_llama_dir)
    base = flops_per_token(model)
    opts = ProtectOptions(preset="default", order=4, **FAST)
    flow.run(model, tok, None, opts, True, slowdown=2.0, serving_batch=3, workload=Workload(20, 5), rounds=1)
    assert calls and all(shape == (3, 20) and steps == 4 for shape, steps, _ in calls)
    assert calls[-1][2] == (1, 3)


def test_measure_ratios_gives_every_phase_from_timed_runs(tiny_llama_dir):
    """A timer returning prefill and decode seconds: per batch the median of paired ratios per phase."""
    model, tok, _ = load_base(tiny_llama_dir)
    opts = ProtectOptions(preset="default", order=4, **FAST).resolved()
    from taylormlp.protection.calibration import calibrate

    data, ranges = calibrate(model, tok, None, opts, True)
    protector = throttle.SlowdownChooser(model, ranges, data, opts, flops_per_token(model)).protector("pieces", 4)

    def timer(m, batch):
        taylor = any(type(layer.mlp).__name__ == "TaylorMLP" for layer in m.model.layers)
        return {"prefill_s": 3.0 if taylor else 1.0, "decode_s": 1.5 if taylor else 1.0}

    ratios, _ = throughput.measure_ratios(protector, 1.0, None, (1, 2), repeats=2, timer=timer)
    assert ratios == {b: {"prefill": 3.0, "decode": 1.5, "request": 2.25} for b in (1, 2)}


def test_workload_needs_slowdown_and_a_p_g_pair(capsys, tmp_path):
    assert main(["protect", "smollm2-135m-instruct", "--workload", "64:8", "--out", str(tmp_path / "r")]) == 2
    assert "--workload 64:8 needs --slowdown X" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["protect", "smollm2-135m-instruct", "--slowdown", "2", "--workload", "64", "--out", str(tmp_path)])
    assert "write it as P:G" in capsys.readouterr().err
    with pytest.raises(TaylorMLPError, match="2 generated tokens"):
        Workload.parse("64:1")


def test_engine_words_say_which_vllm_path_ran_the_release():
    native = engine_words({"name": "vllm", "version": "0.32.0", "mode": "compiled", "dtype": "bfloat16",
                           "release_class": "TaylorMLPLlamaForCausalLM"})
    backend = engine_words({"name": "vllm", "version": "0.32.0", "mode": "compiled", "dtype": "bfloat16",
                            "release_class": "TransformersForCausalLM"})
    assert "natively" in native and "Transformers backend" in backend
