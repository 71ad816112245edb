"""decode.py: greedy decoding with the KV cache, teacher-forced token matching, first divergence, interleaved timing.

Tiny random Llama (conftest.tiny_llama); the timing tests use fake runs, so they check the procedure and the
statistic, not this machine's speed.
"""

import pytest
import torch

from taylormlp.measure import decode

from conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: torch on one thread for this module

PROMPT = torch.tensor([[3, 17, 9, 44, 101, 2, 7, 60]])


@pytest.fixture(scope="module")
def model():
    return tiny_llama(eos_token_id=None)  # no EOS: generate runs its full length, as greedy does


def generate(model, ids, new_tokens):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return out


# ---------------------------------------------------------------- greedy decoding


def test_greedy_equals_generate_and_runs_one_prefill_plus_steps(model):
    calls = []
    handle = model.register_forward_hook(lambda _m, args, kwargs, _o: calls.append(kwargs["input_ids"].shape[1]),
                                         with_kwargs=True)
    try:
        run = decode.greedy(model, PROMPT, 9)
    finally:
        handle.remove()
    assert torch.equal(run.ids, generate(model, PROMPT, 9))
    assert run.prompt_tokens == PROMPT.shape[1] and run.new.shape == (1, 9)
    assert calls == [PROMPT.shape[1]] + [1] * 8  # the prefill, then single-token steps on the cache
    assert run.prefill_s is None and run.decode_s is None  # not timed unless asked


def test_greedy_batch_and_one_dimensional_prompt(model):
    batch = torch.cat([PROMPT, PROMPT.flip(1)])
    assert torch.equal(decode.greedy(model, batch, 5).ids, generate(model, batch, 5))
    assert torch.equal(decode.greedy(model, PROMPT[0], 5).ids, decode.greedy(model, PROMPT, 5).ids)
    assert torch.equal(decode.greedy(model, PROMPT, 1).ids, generate(model, PROMPT, 1))  # prefill only


def test_greedy_through_a_peft_wrapper(model):
    """peft's forward is (*args, **kwargs): the cache argument's name and logits_to_keep are read from the base
    model's forward, and greedy decodes through the wrapper as through the model."""
    import copy

    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert decode._forward_names(wrapped) == decode._forward_names(model) == ({"logits_to_keep": 1}, "cache")
    assert torch.equal(decode.greedy(wrapped, PROMPT, 8).ids, generate(model, PROMPT, 8))  # LoRA starts at zero


def test_greedy_timed(model):
    run = decode.greedy(model, PROMPT, 4, timed=True)
    assert run.prefill_s > 0 and run.decode_s > 0
    res = decode.measure_decode(model, PROMPT, 4)
    assert res["tokens"] == run.new[0].tolist()  # the 4 tokens fed to the 4 decode steps
    assert res["decode_tokens_per_s"] == pytest.approx(4 / res["decode_s"])
    assert res["prefill_tokens_per_s"] == pytest.approx(PROMPT.shape[1] / res["prefill_s"])


def test_measure_decode_of_a_batch_counts_tokens_over_the_batch(model):
    ids = decode.batch_ids(PROMPT[0], 3)
    assert ids.shape == (3, PROMPT.shape[1]) and all(torch.equal(row, PROMPT[0]) for row in ids)
    calls = []
    handle = model.register_forward_hook(lambda _m, args, kwargs, _o: calls.append(kwargs["input_ids"].shape),
                                         with_kwargs=True)
    try:
        res = decode.measure_decode(model, ids, 4)
    finally:
        handle.remove()
    assert calls == [(3, PROMPT.shape[1])] + [(3, 1)] * 4  # one batched prefill, then 4 batched steps
    assert res["batch"] == 3 and res["new_tokens"] == 4
    assert res["decode_tokens_per_s"] == pytest.approx(3 * 4 / res["decode_s"])
    assert res["inter_token_s"] == pytest.approx(res["decode_s"] / 4)
    assert res["prefill_tokens_per_s"] == pytest.approx(3 * PROMPT.shape[1] / res["prefill_s"])
    assert res["tokens"] == decode.greedy(model, PROMPT, 5).new[0, :4].tolist()  # every row: the one prompt's tokens


def test_batch_timings_interleave_every_model_and_batch_in_one_run(monkeypatch):
    order = []

    def fake(m, ids, new_tokens):
        order.append((m, ids.shape[0]))
        t = len(order)
        return {"decode_s": float(t), "prefill_s": 1.0, "decode_tokens_per_s": ids.shape[0] * new_tokens / t,
                "inter_token_s": t / new_tokens, "prefill_tokens_per_s": 1.0, "batch": ids.shape[0], "tokens": [1]}
    monkeypatch.setattr(decode, "measure_decode", fake)
    res = decode.batch_timings({"a": "A", "b": "B"}, PROMPT, 2, repeats=2, batch_sizes=(1, 4, 1))
    assert set(res) == {1, 4} and set(res[1]) == set(res[4]) == {"a", "b"}
    # warm-ups, then rounds over all four (batch, model) pairs with the first one rotating
    assert order == [("A", 1), ("B", 1), ("A", 4), ("B", 4)] * 2 + [("B", 1), ("A", 4), ("B", 4), ("A", 1)]
    assert [r["decode_s"] for r in res[1]["a"]] == [5.0, 12.0] and [r["decode_s"] for r in res[4]["b"]] == [8.0, 11.0]
    assert all("tokens" not in r and r["batch"] == 4 for r in res[4]["a"])


def test_greedy_and_measure_decode_refuse_bad_arguments(model):
    with pytest.raises(ValueError, match="at least 1"):
        decode.greedy(model, PROMPT, 0)
    with pytest.raises(ValueError, match="non-empty"):
        decode.greedy(model, torch.zeros((1, 0), dtype=torch.long), 2)
    with pytest.raises(ValueError, match="at least 1"):
        decode.measure_decode(model, PROMPT, 0)
    with pytest.raises(ValueError, match="non-empty sequences"):
        decode.measure_decode(model, torch.zeros((0, 3), dtype=torch.long), 2)
    with pytest.raises(ValueError, match="at least 1"):
        decode.batch_ids(PROMPT, 0)


# ---------------------------------------------------------------- teacher-forced matching


def reference(model, prompts, new_tokens):
    return [{"ids": decode.greedy(model, p, new_tokens).ids[0], "prompt_len": p.shape[-1]} for p in prompts]


def test_tokens_matched_counts_a_changed_token(model):
    prompts = [PROMPT, PROMPT[:, :5], PROMPT.flip(1)]
    ref = reference(model, prompts, 6)
    assert decode.tokens_matched(model, ref) == {"tokens_matched": 18, "tokens": 18, "sequences_exact": 3,
                                                 "sequences": 3}
    ids = ref[1]["ids"].clone()
    ids[-1] = (ids[-1] + 1) % model.config.vocab_size  # the last token: no later prediction sees it
    ref[1] = {**ref[1], "ids": ids}
    assert decode.tokens_matched(model, ref) == {"tokens_matched": 17, "tokens": 18, "sequences_exact": 2,
                                                 "sequences": 3}


def test_agreement_takes_ids_or_reference_logits():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    assert decode.agreement(logits, torch.tensor([1, 0, 1])).tolist() == [True, True, False]
    other = torch.tensor([[0.0, 9.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert decode.agreement(logits, other).tolist() == [True, False, True]
    count = decode.TokenMatch()
    assert count.add(decode.agreement(logits, logits)) is True
    assert count.add(decode.agreement(logits, other)) is False
    assert count.counts(2) == {"tokens_matched": 5, "tokens": 6, "sequences_exact": 1, "sequences": 2}


def test_validate_counts_with_the_same_core(model):
    ref = reference(model, [PROMPT, PROMPT.flip(1)], 5)
    validation = [{**seq, "logits": logits} for seq, (_, logits) in
                  zip(ref, sorted(decode.continuation_logits(model, ref), key=lambda kv: kv[0]))]
    assert decode.validate(model, validation)["tokens_matched"] == 10
    flipped = validation[0]["logits"].clone()
    flipped[-1] = -flipped[-1]  # the reference's last argmax moves: one token differs
    validation[0] = {**validation[0], "logits": flipped}
    res = decode.validate(model, validation)
    assert (res["tokens_matched"], res["tokens"], res["sequences_exact"], res["exact"]) == (9, 10, 1, False)


# ---------------------------------------------------------------- first divergence


@pytest.mark.parametrize("a, b, expected", [
    ([1, 2, 3], [1, 2, 4], 2),
    ([5, 2, 3], [1, 2, 3], 0),
    ([1, 2, 3], [1, 2, 3], 3),
    ([1, 2], [1, 2, 3], 2),
    ([1, 2, 3, 4], [1, 9], 1),
    ([], [1], 0),
])
def test_first_divergence(a, b, expected):
    assert decode.first_divergence(torch.tensor(a, dtype=torch.long), torch.tensor(b, dtype=torch.long)) == expected
    assert decode.first_divergence(b, a) == expected


# ---------------------------------------------------------------- interleaved timing


def test_interleaved_warms_up_each_then_rotates_the_first():
    order = []

    def run(name):
        def call():
            order.append(name)
            return len(order)  # a fake clock: the call's position
        return call
    res = decode.interleaved({"a": run("a"), "b": run("b"), "c": run("c")}, repeats=3)
    assert "".join(order) == "abc" + "abc" + "bca" + "cab"
    assert res == {"a": [4, 9, 11], "b": [5, 7, 12], "c": [6, 8, 10]}  # round order; warm-ups (1-3) dropped
    order.clear()
    res = decode.interleaved({"a": run("a"), "b": run("b")}, repeats=2, warm=[run("w"), run("v")])
    assert "".join(order) == "wv" + "ab" + "ba" and res == {"a": [3, 6], "b": [4, 5]}  # the warm calls, not a and b
    with pytest.raises(ValueError):
        decode.interleaved({"a": run("a")}, repeats=0)
    with pytest.raises(ValueError):
        decode.interleaved({}, repeats=1)


def test_one_statistic_median_and_paired_ratios():
    runs = [{"decode_s": d, "prefill_s": p, "decode_tokens_per_s": 4 / d, "prefill_tokens_per_s": 8 / p,
             "inter_token_s": d / 4} for d, p in [(2.0, 0.5), (1.0, 0.25), (8.0, 1.0)]]
    summary = decode.timing_summary(runs)
    assert summary == {"decode_s_median": 2.0, "decode_s_spread": 7.0, "decode_tokens_per_s_median": 2.0,
                       "inter_token_s_median": 0.5,
                       "prefill_s_median": 0.5, "prefill_s_spread": 0.75, "prefill_tokens_per_s_median": 16.0}
    assert decode.paired_ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    assert decode.paired_ratios(runs[:2], runs[1:], "decode_s") == [2.0, 0.125]


def test_decode_speed_is_the_median_of_interleaved_runs(monkeypatch):
    # calls: the warm-ups (fast, slow), then the rounds (fast, slow), (slow, fast), (fast, slow)
    speeds = iter([1000.0, 1.0, 10.0, 5.0, 3.0, 30.0, 20.0, 4.0])

    def fake(m, ids, new_tokens):
        tps = next(speeds)
        return {"decode_s": new_tokens / tps, "prefill_s": 1.0, "decode_tokens_per_s": tps,
                "inter_token_s": 1 / tps, "prefill_tokens_per_s": 1.0, "tokens": []}
    monkeypatch.setattr(decode, "measure_decode", fake)
    fast, slow = object(), object()
    # the median of the timed runs: not the best (30) nor the warm-up (1000)
    assert decode.decode_speed({"fast": fast, "slow": slow}, PROMPT[0], 4, 3) == {"fast": 20.0, "slow": 4.0}
