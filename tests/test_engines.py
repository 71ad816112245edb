"""The seam for engines (measure/engines.py): one registry row and one module make an engine, and every command
that runs one takes it from there."""

import sys

import pytest

from taylormlp.cli import main
from taylormlp.common.choices import DEFAULT_ENGINE, ENGINES, EngineRow, engine_names
from taylormlp.common.errors import TaylorMLPError
from taylormlp.measure import engines

NEEDS = {"bench": ("start", "rows", "record", "bench", "in_process", "prior"), "compare": ("compare",),
         "protect": ("start", "rows", "record", "in_process", "prior"), "serve": ("serve",)}

FAKE = '''
from taylormlp.measure.engines import BenchRequest, ServeRequest

SEEN = []


class FakeEngine:
    name = "fake"

    def require(self):
        SEEN.append("require")

    def bench(self, request: BenchRequest) -> dict:
        SEEN.append(("bench", request))
        return {}

    def serve(self, request: ServeRequest) -> int:
        SEEN.append(("serve", request))
        return 0


ENGINE = FakeEngine()
'''


def test_every_row_resolves_to_an_engine_with_what_its_commands_need():
    for name, row in ENGINES.items():
        engine = engines.get(name, row.commands[0])
        assert engine.name == name and callable(engine.require)
        for command in row.commands:
            missing = [m for m in NEEDS[command] if not hasattr(engine, m)]
            assert not missing, (name, command, missing)


def test_each_command_lists_its_engines_default_first():
    for command, default in DEFAULT_ENGINE.items():
        names = engine_names(command)
        assert names[0] == default and set(names) == {n for n, r in ENGINES.items() if command in r.commands}
    assert "vllm" in engine_names("serve") and "taylormlp" not in engine_names("serve")


def test_an_engine_a_command_does_not_offer_is_refused_with_the_ones_it_does():
    with pytest.raises(TaylorMLPError, match="unknown engine 'transformers' for bench; choose one of taylormlp, vllm"):
        engines.get("transformers", "bench")


def test_a_new_engine_is_one_module_and_one_row(tiny_release, tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """A module written here and a row added to the registry: bench and serve offer it and hand it their request;
    nothing else was changed."""
    (tmp_path / "fake_engine_module.py").write_text(FAKE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(ENGINES, "fake", EngineRow("fake_engine_module", ("bench", "serve"), "a test engine"))
    assert main(["bench", str(tiny_llama_dir), str(tiny_release), "--engine", "fake", "--batch-sizes", "4",
                 "--repeats", "2"]) == 0
    assert main(["serve", str(tiny_release), "--engine", "fake", "--port", "8123"]) == 0
    seen = sys.modules["fake_engine_module"].SEEN
    (_, bench), (_, serve) = seen
    assert bench.releases == (tiny_release,) and bench.batch_sizes == [4] and bench.repeats == 2
    assert serve.release == tiny_release and serve.port == 8123
    with pytest.raises(SystemExit):  # its row does not offer protect
        main(["protect", str(tiny_llama_dir), "--out", str(tmp_path / "r"), "--slowdown", "2", "--engine", "fake"])
    assert "invalid choice: 'fake'" in capsys.readouterr().err


def test_sessions_are_warmed_by_one_short_request_then_timed_in_rounds():
    calls = []

    class Session:
        def __init__(self, name):
            self.name = name

        def timed_batch(self, prompts, tokens):
            calls.append((self.name, len(prompts), tokens))
            return {"prefill_s": 1.0, "decode_s": 1.0, "total_s": 2.0}

    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1, 1]]
    runs = engines.timed_sessions({"o": Session("o"), "r": Session("r")}, {1: prompts[:1], 4: prompts}, 16, 2, None)
    warm, timed = calls[:2], calls[2:]
    assert warm == [("o", 1, engines.WARM_TOKENS), ("r", 1, engines.WARM_TOKENS)]
    assert sorted(timed) == sorted([(n, b, 16) for n in "or" for b in (1, 4)] * 2)
    assert set(runs) == {(b, n) for b in (1, 4) for n in "or"} and all(len(v) == 2 for v in runs.values())


def test_vllm_timed_batch_reads_the_prefill_from_per_request_timestamps(monkeypatch):
    """One run: the prefill ends when the batch's last request has its first token (vLLM's engine-core timestamps);
    without timestamps a separate run of one token times it."""
    import time
    import types

    from taylormlp.serve import vllm_engine

    fake = types.ModuleType("vllm")
    fake.SamplingParams = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake)
    clock = iter([100.0, 110.0, 200.0, 210.0, 300.0, 303.0])
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))

    class LLM:
        def __init__(self, stamps):
            self.stamps, self.runs = stamps, []

        def generate(self, requests, params, use_tqdm):
            self.runs.append(params["max_tokens"])
            return [types.SimpleNamespace(metrics=None if s is None else types.SimpleNamespace(first_token_ts=s))
                    for s in self.stamps]

    llm = LLM([101.0, 104.0])
    run = vllm_engine.timed_batch(llm, [[1, 2], [3, 4]], 11)
    assert llm.runs == [11] and run["prefill_s"] == 4.0 and run["total_s"] == 10.0 and run["decode_s"] == 6.0
    assert run["inter_token_s"] == pytest.approx(0.6)
    llm = LLM([None, None])
    run = vllm_engine.timed_batch(llm, [[1, 2], [3, 4]], 11)  # clock: 300 .. 303 for the one-token run
    assert llm.runs == [11, 1] and run["prefill_s"] == 3.0 and run["total_s"] == 10.0


class ScriptedSession:
    """A session whose greedy tokens are given: one list per prompt."""

    def __init__(self, tokens, log):
        self.tokens, self.log, self.info = tokens, log, {"version": "9.9", "dtype": "float32", "model_class": "Fake"}

    def generate(self, prompts, tokens):
        self.log.append(("generate", len(prompts), tokens))
        return [list(t) for t in self.tokens]

    def close(self):
        self.log.append("close")


def test_compare_on_sessions_cuts_each_continuation_after_eos_and_counts_identical(tiny_llama_dir, tiny_release,
                                                                                   smol_tokenizer):
    """Both sessions generate every prompt in one batch, exactly max_new_tokens; continuations are compared up to
    their first EOS (kept), as a generation stopping at EOS ends."""
    from taylormlp.measure.compare import compare_on_sessions
    from taylormlp.measure.engines import CompareRequest

    eos = smol_tokenizer.eos_token_id
    log, started = [], []
    outputs = {"original": [[5, 6, eos, 9, 9], [5, 6, 7, 8, 9], [1, 2, 3, 4, 5]],
               "release": [[5, 6, eos, 1, 1], [5, 6, 0, 8, 9], [1, 2, 3, 4, 5]]}

    class Engine:
        name = "scripted"

        def require(self):
            log.append("require")

        def start(self, path, log_path, dtype, max_model_len):
            started.append((str(path), dtype, max_model_len))
            return ScriptedSession(outputs["original" if len(started) == 1 else "release"], log)

    prompts = ({"kind": "raw", "text": "Hello"}, {"kind": "chat", "text": "Hi there"}, {"kind": "raw", "text": "x"})
    result = compare_on_sessions(Engine(), CompareRequest(tiny_llama_dir, tiny_release, prompts, 5, "float32"))
    assert [s[1] for s in started] == ["float32", "float32"] and started[1][0] == str(tiny_release)
    assert log == ["require", ("generate", 3, 5), ("generate", 3, 5), "close", "close"]
    rows = result["rows"]
    assert [r["identical"] for r in rows] == [True, False, True] and result["identical"] == 2
    assert rows[0]["tokens_original"] == 3 and rows[1]["first_divergence"] == 2  # cut after EOS; parts at token 2
    assert result["engine"] == {"name": "scripted", "version": "9.9", "dtype": "float32", "model_class": "Fake"}
    assert result["prompts"] == 3 and result["order"] == 12


def test_compare_takes_its_engine_from_the_registry(tiny_release, tiny_llama_dir, tmp_path, monkeypatch):
    (tmp_path / "fake_compare_engine.py").write_text(
        "SEEN = []\n"
        "class E:\n"
        "    name = 'fakec'\n"
        "    def require(self): SEEN.append('require')\n"
        "    def compare(self, request):\n"
        "        SEEN.append(request)\n"
        "        return {'rows': [], 'identical': 0, 'prompts': 0, 'max_new_tokens': request.max_new_tokens,\n"
        "                'coverage': 1.0, 'order': 1, 'basis': 'taylor', 'latency_ratio': 1.0}\n"
        "ENGINE = E()\n")
    prompts = tmp_path / "p.json"
    prompts.write_text('["one", "two"]')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(ENGINES, "fakec", EngineRow("fake_compare_engine", ("compare",), "a test engine"))
    assert main(["compare", str(tiny_llama_dir), str(tiny_release), "--prompts", str(prompts), "--engine", "fakec",
                 "--dtype", "bfloat16", "--max-new-tokens", "7"]) == 0
    seen = sys.modules["fake_compare_engine"].SEEN
    assert seen[0] == "require" and seen[1].dtype == "bfloat16" and seen[1].max_new_tokens == 7
    assert [p["text"] for p in seen[1].prompts] == ["one", "two"]


def test_our_runtime_compares_in_its_own_dtype_only(tiny_release, tiny_llama_dir, tmp_path):
    prompts = tmp_path / "p.json"
    prompts.write_text('["one"]')
    with pytest.raises(TaylorMLPError, match="--dtype bfloat16 is for an engine"):
        engines.get("taylormlp", "compare").compare(engines.CompareRequest(tiny_llama_dir, tiny_release,
                                                                           ({"kind": "raw", "text": "one"},), 4,
                                                                           "bfloat16"))


def test_our_runtime_s_session_generates_transformers_greedy_tokens(tiny_llama_dir):
    """RuntimeSession.generate: exactly `tokens` greedy tokens per prompt (EOS does not stop them), the tokens
    transformers' own generate gives when told not to stop."""
    import torch

    from taylormlp.release.sources import load_base

    session = engines.get("taylormlp", "compare").start(tiny_llama_dir)
    prompts = [[1, 50, 60, 70], [1, 900, 33, 7]]
    got = session.generate(prompts, 6)
    model = load_base(tiny_llama_dir)[0]
    model.generation_config.eos_token_id = None  # no stopping token: every prompt runs its 6 tokens
    ref = model.generate(torch.tensor(prompts), max_new_tokens=6, do_sample=False, pad_token_id=0,
                         attention_mask=torch.ones(2, 4, dtype=torch.long))[:, 4:].tolist()
    assert got == ref and all(len(t) == 6 for t in got)
    session.close()
