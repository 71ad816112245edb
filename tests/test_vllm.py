"""Releases on vLLM (marked `vllm`: `make test` runs them in .venv-vllm, where vLLM's CPU build is installed).

Every engine runs in a process of its own (taylormlp.serve.vllm_engine.run_engine), at vLLM's defaults plus the two
settings a release needs (vllm_engine.RELEASE_FLAGS): compiled mode (torch.compile) unless a case says eager.  The
reference is load_release + decode.greedy in the same process as the test, with the same no-stopping rule.

Releases of every kind the runtime has: one series piece per channel with a plain `rest` MLP beside it and a layer
with no protected channel at all (paper preset), several pieces per channel with no rest (default preset), and one
release of each other tiny architecture vLLM's Transformers backend runs.
"""

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import FAST, free_port, save_tiny_chat_model, tiny

from taylormlp import load_release
from taylormlp.measure.decode import greedy
from taylormlp.protection.flow import protect_to_release
from taylormlp.runtime import LOAD_NOTICE
from taylormlp.serve.vllm_engine import run_engine

# every test here needs vLLM (each engine runs in a child process, which fails without it): `make test` runs them in
# .venv-vllm with -m vllm and leaves them out of .venv's run with -m "not vllm"
pytestmark = pytest.mark.vllm

PROMPTS = [[1, 50, 60, 70], [1, 900, 33], [1, 5, 6, 7, 8, 9, 10]]
NEW = 12
# vLLM's CPU attention takes head sizes that are multiples of 32: hidden 64 over 2 heads
SHAPE = dict(hidden=64, inter=64, layers=3, num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="module")
def releases(tmp_path_factory, smol_tokenizer):
    """{'paper': one piece per channel + rest + a layer with none protected, 'pieces': pieces, no rest}."""
    root = tmp_path_factory.mktemp("vllm")
    # layer 1's gate 30x wider than the others': the narrowest-first paper selection protects none of its channels;
    # attention scaled so that greedy answers depend on the prompt
    paper_src = save_tiny_chat_model(root / "src-paper", smol_tokenizer, 4.0, (10.0, 300.0, 10.0), **SHAPE)
    pieces_src = save_tiny_chat_model(root / "src-pieces", smol_tokenizer, 4.0, **SHAPE)
    out = {"paper": root / "paper", "pieces": root / "pieces"}
    protect_to_release(paper_src, out["paper"], preset="paper", coverage=0.5, **FAST)
    protect_to_release(pieces_src, out["pieces"], preset="default", order=12, **FAST)
    return out


def _layers(release):
    return json.loads((release / "config.json").read_text())["taylormlp"]["layers"]


def _reference(release, dtype=torch.float32):
    model = load_release(release, dtype=dtype)
    return [greedy(model, torch.tensor([p]), NEW).new[0].tolist() for p in PROMPTS]


def _vllm(release, tmp_path, **kw):
    return run_engine("greedy", release, {"prompts": PROMPTS, "new_tokens": NEW}, tmp_path, **kw)["tokens"]


def test_the_releases_hold_every_kind_of_layer(releases):
    paper, pieces = _layers(releases["paper"]), _layers(releases["pieces"])
    assert any(row["protected"] == 0 and row["rest"] > 0 for row in paper)  # rest alone
    assert any(row["protected"] > 0 and row["rest"] > 0 and row["pieces"] == row["protected"] for row in paper)
    assert all(row["pieces"] > row["protected"] > 0 for row in pieces)  # several pieces per channel
    assert any(row["rest"] == 0 for row in pieces)


@pytest.mark.parametrize("eager", [False, True], ids=["compiled", "eager"])
@pytest.mark.parametrize("kind", ["paper", "pieces"])
def test_vllm_float32_greedy_equals_load_release(releases, kind, eager, tmp_path):
    reference = _reference(releases[kind])
    assert len({tuple(r) for r in reference}) == len(PROMPTS)  # prompt-dependent answers: a real comparison
    assert _vllm(releases[kind], tmp_path, dtype="float32", eager=eager) == reference


@pytest.mark.parametrize("kind,eager", [("paper", False), ("pieces", True)], ids=["paper-compiled", "pieces-eager"])
def test_vllm_bfloat16_runs_and_follows_load_release(releases, kind, eager, tmp_path):
    """bf16 (vLLM's CPU default dtype): vLLM's own bf16 kernels round differently from torch's, so the measure is
    agreement, not identity: at least 2 of the 3 greedy sequences equal load_release's in bf16."""
    reference = _reference(releases[kind], torch.bfloat16)
    got = _vllm(releases[kind], tmp_path, dtype="bfloat16", eager=eager)
    assert all(len(g) == NEW for g in got)
    assert sum(g == r for g, r in zip(got, reference)) >= 2


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "gemma3_text", "phi"])
def test_other_architectures_on_vllm_compiled(arch, smol_tokenizer, tmp_path):
    extras = dict(num_attention_heads=2)
    extras.update(num_key_value_heads=1, head_dim=32) if arch != "phi" else None
    model = tiny(arch, vocab=len(smol_tokenizer), hidden=64, inter=64, layers=2, **extras)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("gate_proj" in name or "fc1" in name) and p.dim() == 2:
                p.mul_(10.0)
    model.save_pretrained(tmp_path / "src")
    smol_tokenizer.save_pretrained(tmp_path / "src")
    protect_to_release(tmp_path / "src", tmp_path / "rel", preset="default", order=8, chat=False, **FAST)
    assert _vllm(tmp_path / "rel", tmp_path, dtype="float32") == _reference(tmp_path / "rel")


def test_vllm_without_the_release_flags_refuses_with_the_how_to_load_line(releases, tmp_path):
    with pytest.raises(Exception) as failure:
        _vllm(releases["paper"], tmp_path, dtype="float32", eager=True, flags=False)
    log = next(tmp_path.glob("*.log")).read_text()
    assert LOAD_NOTICE in log and "failed" in str(failure.value)


def test_tensor_parallel_2_gives_the_tokens_of_1(releases, tmp_path):
    assert _vllm(releases["pieces"], tmp_path, dtype="float32", eager=True, tensor_parallel=2) == \
        _reference(releases["pieces"])


def test_taylormlp_serve_engine_vllm(releases, smol_tokenizer, tmp_path):
    """`taylormlp serve RELEASE --engine vllm`: 4 concurrent greedy chats equal load_release + generate's text, a
    malformed request gets a 4xx and the next is answered, SIGINT stops it with exit status 0."""
    from openai import BadRequestError, OpenAI, UnprocessableEntityError

    from taylormlp.measure.generate import generate_ids

    release, port = releases["paper"], free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "taylormlp.cli", "serve", str(release), "--engine", "vllm",
                               "--port", str(port), "--dtype", "float32"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        deadline = time.time() + 600
        while True:
            try:
                client.models.list()
                break
            except Exception:
                assert server.poll() is None and time.time() < deadline, server.stdout.read()[-3000:]
                time.sleep(2)
        questions = ["Hello there", "What is a cat?", "Count to three", "Name a colour"]

        def chat(q):  # the text, and the token ids behind it (vLLM's return_token_ids): a random tiny model writes
            # byte tokens that no text shows the same way twice (vLLM holds back an incomplete UTF-8 sequence)
            answer = client.chat.completions.create(model=release.name, max_tokens=10, temperature=0,
                                                    messages=[{"role": "user", "content": q}],
                                                    extra_body={"return_token_ids": True})
            return answer.choices[0].message.content, list(answer.choices[0].token_ids)

        with ThreadPoolExecutor(4) as pool:
            served = list(pool.map(chat, questions))
        model = load_release(release)
        expected = [generate_ids(model, smol_tokenizer, q, chat=True, max_new_tokens=10)[0].tolist()
                    for q in questions]
        assert [ids for _, ids in served] == expected
        texts = [smol_tokenizer.decode(ids, skip_special_tokens=True) for ids in expected]
        assert sum(text == served_text for text, (served_text, _) in zip(texts, served)) >= 3  # same text as well
        with pytest.raises((BadRequestError, UnprocessableEntityError)):
            client.chat.completions.create(model=release.name, max_tokens="many", messages="not a list")
        assert chat(questions[0])[1] == expected[0]
    finally:
        server.send_signal(signal.SIGINT)
        code = server.wait(timeout=120)
    assert code == 0


def test_bench_engine_vllm_times_every_model_at_every_batch(releases, tmp_path):
    """The bench's shape on vLLM (timings are the machine's: nothing here asserts a speed): one row per batch size and
    model, the original at 1.00x, a release's work model above the original's."""
    from taylormlp.measure.vllm_bench import run_vllm_bench

    source = releases["pieces"].parent / "src-pieces"
    results = run_vllm_bench(source, [releases["pieces"]], batch_sizes=(2,), tokens=4, repeats=1, dtype="float32",
                             json_path=tmp_path / "b.json", workdir=tmp_path)
    rows = {(r["batch"], r["name"]): r for r in results["throughput"]}
    assert set(rows) == {(b, n) for b in (1, 2) for n in ("original", "pieces")}
    assert rows[1, "original"]["slowdown"] == 1.0 and all(r["decode_tokens_per_s"] > 0 for r in rows.values())
    release = next(m for m in results["models"] if m["name"] == "pieces")
    assert release["flops_ratio"] > 1.05 and release["bytes_ratio"] > 1.05  # tiny: the head's FLOPs dominate
    assert json.loads((tmp_path / "b.json").read_text())["engine"] == "vllm"


def test_protect_slowdown_engine_vllm_dials_on_the_engine(releases, tmp_path):
    """The engine dial end to end on a tiny model (nothing here asserts a speed): throttle.choose_slowdown measuring with
    vllm_dial.EngineDial (eager, float32, short runs, the probe only): every read comes from vLLM, the record and
    the card name the engine, and closing the dial stops every engine and deletes every candidate (its log stays)."""
    from taylormlp.measure.throughput import measure_prompt_ids
    from taylormlp.protection import flow
    from taylormlp.protection.calibration import calibrate
    from taylormlp.protection.options import ProtectOptions
    from taylormlp.protection.throttle import choose_slowdown
    from taylormlp.protection.vllm_dial import EngineDial
    from taylormlp.release.card import model_card
    from taylormlp.release.sources import load_base

    source = releases["pieces"].parent / "src-pieces"
    model, tok, _ = load_base(source)
    dial = EngineDial(source, tok, measure_prompt_ids(tok, True)[0].tolist(), dtype="float32", eager=True, tokens=4,
                      repeats=1, workdir=tmp_path / "dial")
    try:
        opts = ProtectOptions(preset="default", order=8, **FAST).resolved()
        data, ranges = calibrate(model, tok, None, opts, True)
        setting = choose_slowdown(model, tok, True, (data, ranges), opts, 2.0, measure=dial, rounds=1, serving_batch=2)
        spec, slow = flow.finish(setting, data, ranges).to_dict(), setting.slowdown
        assert dial.candidate is not None and dial.original.child.poll() is None  # kept loaded across reads
    finally:
        dial.close()
    left = [d for d in (tmp_path / "dial").glob("candidate-*") if d.is_dir()]
    assert dial.original is None and dial.candidate is None and not left
    engine = slow["engine"]
    assert engine["name"] == "vllm" and engine["version"] and engine["mode"] == "eager" and engine["dtype"] == "float32"
    assert [p["batch"] for p in slow["curve"]] == [1, 2, 8, 32] and all(p["measured"] > 0 for p in slow["curve"])
    assert len(slow["reads"]) >= 2 and isinstance(slow["curve_agrees"], bool)
    assert f"vLLM {engine['version']} (eager, float32)" in model_card(spec, slowdown=slow)
