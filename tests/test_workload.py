"""bench's workload (--prompt-tokens P --new-tokens G): its prompts, the three slowdowns from timed rounds (injected
timings: nothing here asserts a speed), the FLOPs of a prefill, and the command on a tiny release."""

import json

import pytest
import torch

from conftest import tiny_llama

from taylormlp.cli.parser import main as cli_main
from taylormlp.common.errors import TaylorMLPError
from taylormlp.measure import decode
from taylormlp.measure.cost import flops_per_token, forward_flops
from taylormlp.measure import engines
from taylormlp.measure.engine_taylormlp import RuntimeSession
from taylormlp.measure.throughput import throughput_rows
from taylormlp.measure.workload import Workload, workload_prompts


def test_workload_parse_and_limits():
    assert Workload.parse("512:128") == Workload(512, 128)
    assert Workload.parse(" 64 : 2 ").label == "64:2"
    for bad in ("512", "512:", "a:b", "512:128:1", "-1:4"):
        with pytest.raises(TaylorMLPError, match="P:G"):
            Workload.parse(bad)
    with pytest.raises(TaylorMLPError, match="2 generated tokens"):
        Workload(16, 1)
    with pytest.raises(TaylorMLPError, match="at least 1 prompt token"):
        Workload(0, 8)


def test_workload_prompts_are_distinct_windows_of_exactly_p_tokens(smol_tokenizer):
    prompts = workload_prompts(smol_tokenizer, 100, 6)
    assert [len(p) for p in prompts] == [100] * 6
    assert len({tuple(p) for p in prompts}) == 6
    text = smol_tokenizer.decode(prompts[0])
    assert len(text.split()) > 30  # words of real prose, not padding or one repeated token
    assert len(set(prompts[0])) > 40


class _BosTokenizer:
    """A stand-in tokenizer that puts BOS (id 1) before every text it encodes with special tokens."""
    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        ids = [2 + (ord(c) % 50) for c in text]
        return type("Enc", (), {"input_ids": ([1] if add_special_tokens else []) + ids})()


def test_workload_prompts_start_with_bos_where_the_tokenizer_adds_one():
    prompts = workload_prompts(_BosTokenizer(), 20, 3)
    assert all(len(p) == 20 and p[0] == 1 and 1 not in p[1:] for p in prompts)


def test_workload_prompts_refuse_more_text_than_the_corpus_holds(smol_tokenizer):
    with pytest.raises(TaylorMLPError, match="fewer prompts|smaller --prompt-tokens"):
        workload_prompts(smol_tokenizer, 200_000, 64)


def _run(prefill, decode_s):
    return {"prefill_s": prefill, "decode_s": decode_s}


def test_workload_rows_are_medians_of_paired_ratios_per_phase():
    """Three rounds; the release's ratios per round: prefill 4, 2, 3 (median 3), decode 1.5, 2.5, 2 (median 2),
    request (p + d) 9/4... computed by hand below; a ratio of medians would differ."""
    base = [_run(1.0, 2.0), _run(2.0, 2.0), _run(1.0, 4.0)]
    mine = [_run(4.0, 3.0), _run(4.0, 5.0), _run(3.0, 8.0)]
    runs = {2: {"original": base, "rel": mine}}
    rows = {r["name"]: r for r in throughput_rows(runs, "original", 4, Workload(16, 5))}
    rel = rows["rel"]
    assert rel["prefill_slowdown"] == 3.0 and (rel["prefill_slowdown_min"], rel["prefill_slowdown_max"]) == (2.0, 4.0)
    assert rel["decode_slowdown"] == 2.0
    # request per round: 7/3, 9/4, 11/5 -> median 9/4 (the ratio of median request times would be 9/4 too here, so
    # check the range, which only the paired ratios give)
    assert rel["request_slowdown"] == pytest.approx(9 / 4)
    assert (rel["request_slowdown_min"], rel["request_slowdown_max"]) == pytest.approx((11 / 5, 7 / 3))
    assert rel["prefill_s"] == 4.0 and rel["decode_s"] == 5.0 and rel["request_s"] == 9.0
    assert rel["request_tokens_per_s"] == pytest.approx(2 * 5 / 9.0)
    assert rows["original"]["request_slowdown"] == 1.0 and rows["original"]["kind"] == "original"
    assert rel["batch"] == 2 and rel["prompt_tokens"] == 16 and rel["new_tokens"] == 5


def test_batch_ids_takes_the_first_prompts_of_several():
    prompts = torch.arange(12).reshape(4, 3)
    assert decode.batch_ids(prompts, 2).tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="4 prompts for a batch of 5"):
        decode.batch_ids(prompts, 5)


def test_forward_flops_of_a_prefill_grow_with_its_length():
    model = tiny_llama()
    one = flops_per_token(model, 5)
    assert forward_flops(model, [5]) == one
    assert forward_flops(model, [5] * 16) >= 16 * one  # every token through every matmul, and attention on top


def test_workload_bench_on_a_tiny_release(tiny_release, tiny_llama_dir, tmp_path, monkeypatch):
    """Timings injected per session of our runtime (the release 3x the original's prefill, 2x its decode), taken
    from the engine registry as the command does: the table rows, the FLOPs ratios and the files."""
    original = {"prefill_s": 1.0, "decode_s": 1.0}
    slow = {"prefill_s": 3.0, "decode_s": 2.0}
    seen = []

    def fake_timed_batch(self, prompts, tokens):
        seen.append((len(prompts), max(map(len, prompts)), min(map(len, prompts)), tokens))
        return dict(slow if hasattr(self.model.config, "taylormlp") else original)

    monkeypatch.setattr(RuntimeSession, "timed_batch", fake_timed_batch)
    request = engines.BenchRequest(tiny_llama_dir, (tiny_release,), batch_sizes=(4,), repeats=2,
                                   workload=Workload(24, 6), json_path=tmp_path / "w.json", plot_path=tmp_path / "w.png")
    results = engines.get("taylormlp", "bench").bench(request)
    # one short warm-up request per model, then 2 rounds of each model at batch 1 and 4, prompts of 24 tokens, 6 each
    assert seen[:2] == [(1, 24, 24, engines.WARM_TOKENS)] * 2
    assert sorted(set(seen[2:])) == [(1, 24, 24, 6), (4, 24, 24, 6)] and len(seen[2:]) == 2 * 2 * 2
    rows = {(r["batch"], r["name"]): r for r in results["rows"]}
    assert set(rows) == {(b, n) for b in (1, 4) for n in ("original", "release")}
    assert rows[4, "release"]["prefill_slowdown"] == 3.0 and rows[4, "release"]["decode_slowdown"] == 2.0
    assert rows[4, "release"]["request_slowdown"] == 2.5
    model = results["models"][1]
    assert model["flops_ratio"] > 1.0 and model["prefill_flops_ratio"] > 1.0
    saved = json.loads((tmp_path / "w.json").read_text())
    assert saved["workload"] == {"prompt_tokens": 24, "new_tokens": 6} and saved["engine"] == "taylormlp"
    assert (tmp_path / "w.png").stat().st_size > 1000


def test_bench_workload_flags(tiny_release, tiny_llama_dir, capsys):
    assert cli_main(["bench", str(tiny_llama_dir), str(tiny_release), "--new-tokens", "8"]) == 2
    assert "--new-tokens 8 sets a workload's generated tokens and needs --prompt-tokens" in capsys.readouterr().err
    assert cli_main(["bench", str(tiny_llama_dir), str(tiny_release), "--prompt-tokens", "8",
                     "--serve-concurrency", "1"]) == 2
    assert "drop --serve-concurrency" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["bench", str(tiny_llama_dir), str(tiny_release), "--prompt-tokens", "8", "--new-tokens", "1"])
    assert "at least 2" in capsys.readouterr().err
