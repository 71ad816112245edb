"""Releases on vLLM (marked `vllm`: `make test` runs them in .venv-vllm, where vLLM's CPU build is installed).

Every engine runs in a process of its own (taylormlp.serve.vllm_engine.run_engine), at vLLM's defaults: compiled mode
(torch.compile) unless a case says eager.  Llama, Mistral and Qwen2 releases run as native vLLM models (taylormlp's
plugin, no flag; serve/vllm_native.py), the other architectures on vLLM's Transformers backend with its two settings
(vllm_engine.TRANSFORMERS_FLAGS).  The reference is load_release + decode.greedy in the same process as the test, with
the same no-stopping rule.

Releases of every kind the runtime has: one series piece per channel with a plain `rest` MLP beside it and a layer
with no protected channel at all (paper preset), several pieces per channel with no rest (default preset), pieces
with a rest MLP and channel counts that do not divide by 2 (the tensor-parallel case), and one release of each other
tiny architecture.
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

NATIVE = "TaylorMLPLlamaForCausalLM"  # the class taylormlp's plugin builds for a Llama release
BACKEND = "TransformersForCausalLM"  # vLLM's Transformers backend

# every test here needs vLLM (each engine runs in a child process, which fails without it): `make test` runs them in
# .venv-vllm with -m vllm and leaves them out of .venv's run with -m "not vllm"
pytestmark = pytest.mark.vllm

PROMPTS = [[1, 50, 60, 70], [1, 900, 33], [1, 5, 6, 7, 8, 9, 10]]
NEW = 12
# vLLM's CPU attention takes head sizes that are multiples of 32: hidden 64 over 2 heads
SHAPE = dict(hidden=64, inter=64, layers=3, num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="module")
def releases(tmp_path_factory, smol_tokenizer):
    """{'paper': one piece per channel + rest + a layer with none protected, 'pieces': pieces, no rest, 'mixed':
    pieces + rest, odd channel counts (intermediate 66, coverage 0.5)}."""
    root = tmp_path_factory.mktemp("vllm")
    # layer 1's gate 30x wider than the others': the narrowest-first paper selection protects none of its channels;
    # attention scaled so that greedy answers depend on the prompt
    paper_src = save_tiny_chat_model(root / "src-paper", smol_tokenizer, 4.0, (10.0, 300.0, 10.0), **SHAPE)
    pieces_src = save_tiny_chat_model(root / "src-pieces", smol_tokenizer, 4.0, **SHAPE)
    mixed_src = save_tiny_chat_model(root / "src-mixed", smol_tokenizer, 4.0, (10.0, 300.0, 10.0),
                                     **{**SHAPE, "inter": 66})
    out = {"paper": root / "paper", "pieces": root / "pieces", "mixed": root / "mixed"}
    protect_to_release(paper_src, out["paper"], preset="paper", coverage=0.5, **FAST)
    protect_to_release(pieces_src, out["pieces"], preset="default", order=12, **FAST)
    protect_to_release(mixed_src, out["mixed"], preset="default", coverage=0.5, order=10, **FAST)
    return out


def _layers(release):
    return json.loads((release / "config.json").read_text())["taylormlp"]["layers"]


def _reference(release, dtype=torch.float32):
    model = load_release(release, dtype=dtype)
    return [greedy(model, torch.tensor([p]), NEW).new[0].tolist() for p in PROMPTS]


def _run(release, tmp_path, shares=False, **kw):
    return run_engine("greedy", release, {"prompts": PROMPTS, "new_tokens": NEW, "shares": shares}, tmp_path, **kw)


def _vllm(release, tmp_path, model_class=NATIVE, **kw):
    """The greedy tokens of RELEASE on vLLM, after checking which class vLLM built for it."""
    out = _run(release, tmp_path, **kw)
    assert out["model_class"] == model_class
    return out["tokens"]


def test_the_releases_hold_every_kind_of_layer(releases):
    paper, pieces = _layers(releases["paper"]), _layers(releases["pieces"])
    assert any(row["protected"] == 0 and row["rest"] > 0 for row in paper)  # rest alone
    assert any(row["protected"] > 0 and row["rest"] > 0 and row["pieces"] == row["protected"] for row in paper)
    assert all(row["pieces"] > row["protected"] > 0 for row in pieces)  # several pieces per channel
    assert any(row["rest"] == 0 for row in pieces)
    mixed = _layers(releases["mixed"])  # pieces and rest together, counts that 2 ranks split unevenly
    assert all(row["pieces"] > row["protected"] > 0 and row["rest"] > 0 for row in mixed)
    assert any(row["protected"] % 2 for row in mixed) and any(row["rest"] % 2 for row in mixed)
    for release in releases.values():
        assert json.loads((release / "config.json").read_text())["architectures"] == [NATIVE, "LlamaForCausalLM"]


@pytest.mark.parametrize("eager", [False, True], ids=["compiled", "eager"])
@pytest.mark.parametrize("kind", ["paper", "pieces", "mixed"])
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


def test_series_dtypes_on_a_bfloat16_engine(monkeypatch):
    """z0/h and Θ dtypes per TAYLORMLP_VLLM_SERIES_DTYPE on a bf16 engine: mixed (the default) keeps t's inputs in
    float32 and Θ in bf16; a value it does not know is refused with the choices."""
    from taylormlp.serve import vllm_native

    monkeypatch.setattr(torch, "get_default_dtype", lambda: torch.bfloat16)
    monkeypatch.delenv(vllm_native.SERIES_DTYPE_ENV, raising=False)
    assert vllm_native.series_dtypes() == (torch.float32, torch.bfloat16)
    for value, want in [("mixed", (torch.float32, torch.bfloat16)), ("float32", (torch.float32, torch.float32)),
                        ("auto", (torch.bfloat16, torch.bfloat16))]:
        monkeypatch.setenv(vllm_native.SERIES_DTYPE_ENV, value)
        assert vllm_native.series_dtypes() == want
    monkeypatch.setenv(vllm_native.SERIES_DTYPE_ENV, "fp8")
    with pytest.raises(ValueError, match="mixed, float32, auto"):
        vllm_native.series_dtypes()


@pytest.mark.parametrize("arch,model_class", [("mistral", "TaylorMLPMistralForCausalLM"),
                                              ("qwen2", "TaylorMLPQwen2ForCausalLM"),
                                              ("gemma3_text", BACKEND), ("phi", BACKEND)])
def test_other_architectures_on_vllm_compiled(arch, model_class, smol_tokenizer, tmp_path):
    """Mistral and Qwen2 natively (no flag), Gemma-3 and Phi on the Transformers backend (its two settings)."""
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
    assert _vllm(tmp_path / "rel", tmp_path, model_class, dtype="float32") == _reference(tmp_path / "rel")


def test_without_taylormlp_vllm_refuses_a_release_loudly(releases, tmp_path):
    """vLLM without taylormlp's plugin (VLLM_PLUGINS names none of ours) does not know the release's first
    architecture and takes the next, its own Llama, which stops on the masked activation with the how-to-load line
    (what to install) before it builds an MLP."""
    with pytest.raises(Exception) as failure:
        _run(releases["paper"], tmp_path, dtype="float32", eager=True, plugin=False)
    log = next(tmp_path.glob("*.log")).read_text()
    assert LOAD_NOTICE in log and "pip install taylormlp" in LOAD_NOTICE and "failed" in str(failure.value)


def _as_written_before_the_plugin(release, out):
    """A copy of RELEASE whose config.json names the stock class, as releases before the plugin did."""
    import shutil

    from taylormlp.release.directory import write_manifest

    shutil.copytree(release, out)
    config = json.loads((out / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (out / "config.json").write_text(json.dumps(config))
    write_manifest(out)
    return out


def test_a_release_written_before_the_plugin_runs_on_the_transformers_backend(releases, tmp_path):
    """Such a release (architectures: the stock class) is refused by vLLM's own Llama with the how-to-load line, and
    runs with the two settings, which engine_kwargs gives it."""
    old = _as_written_before_the_plugin(releases["paper"], tmp_path / "old")
    with pytest.raises(Exception):
        _run(old, tmp_path / "refused", dtype="float32", eager=True, impl="none")
    assert LOAD_NOTICE in next((tmp_path / "refused").glob("*.log")).read_text()
    assert _vllm(old, tmp_path, BACKEND, dtype="float32", eager=True) == _reference(releases["paper"])


def test_a_native_release_runs_on_the_transformers_backend_too(releases, tmp_path):
    assert _vllm(releases["pieces"], tmp_path, BACKEND, dtype="float32", impl="transformers") == \
        _reference(releases["pieces"])


def test_the_plugin_leaves_stock_models_alone(releases, tmp_path):
    """A stock tiny Llama: vLLM's own class, the same tokens with and without taylormlp's plugin."""
    source = releases["paper"].parent / "src-paper"
    with_plugin = _vllm(source, tmp_path / "with", "LlamaForCausalLM", dtype="float32", eager=True)
    assert len({tuple(t) for t in with_plugin}) == len(PROMPTS)
    assert _vllm(source, tmp_path / "without", "LlamaForCausalLM", dtype="float32", eager=True,
                 plugin=False) == with_plugin


@pytest.mark.parametrize("kind,eager", [("mixed", False), ("paper", True)], ids=["mixed-compiled", "paper-eager"])
def test_tensor_parallel_2_splits_the_series_and_gives_the_tokens_of_1(releases, kind, eager, tmp_path):
    """Two ranks: load_release's tokens, and each rank holds about half of every layer's series (Θ, z0, h, the
    pieces' index and edges), read from the ranks' own tensors; at most 0.55 of the whole."""
    out = _run(releases[kind], tmp_path, shares=True, dtype="float32", eager=eager, tensor_parallel=2)
    assert out["model_class"] == NATIVE and out["tokens"] == _reference(releases[kind])
    ranks = out["shares"]
    assert len(ranks) == 2 and len(ranks[0]) == len(_layers(releases[kind]))
    for layer in zip(*ranks):
        whole = layer[0]["whole_bytes"]
        assert all(r["whole_bytes"] == whole for r in layer)
        assert sum(r["rank_bytes"] for r in layer) == whole  # every series tensor on exactly one rank
        assert all(r["rank_bytes"] <= 0.55 * whole for r in layer)


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
    from taylormlp.measure import engines
    from taylormlp.measure.engine_bench import run_engine_bench

    source = releases["pieces"].parent / "src-pieces"
    request = engines.BenchRequest(source, (releases["pieces"],), batch_sizes=(2,), tokens=4, repeats=1,
                                   dtype="float32", json_path=tmp_path / "b.json")
    results = run_engine_bench(engines.get("vllm", "bench"), request, workdir=tmp_path)
    rows = {(r["batch"], r["name"]): r for r in results["throughput"]}
    backend = "pieces (Transformers backend)"  # the same release on vLLM's Transformers backend, beside the native
    assert set(rows) == {(b, n) for b in (1, 2) for n in ("original", "pieces", backend)}
    assert rows[1, "original"]["slowdown"] == 1.0 and all(r["decode_tokens_per_s"] > 0 for r in rows.values())
    models = {m["name"]: m for m in results["models"]}
    assert models["pieces"]["engine_class"] == NATIVE and models[backend]["engine_class"] == BACKEND
    assert models["original"]["engine_class"] == "LlamaForCausalLM"
    release = models["pieces"]
    assert release["flops_ratio"] > 1.05 and release["bytes_ratio"] > 1.05  # tiny: the head's FLOPs dominate
    assert models[backend]["flops_ratio"] == release["flops_ratio"]
    assert json.loads((tmp_path / "b.json").read_text())["engine"] == "vllm"


def test_bench_engine_vllm_workload_times_distinct_prompts(releases, tmp_path):
    """`bench --engine vllm --prompt-tokens P --new-tokens G`: per batch size and model the three slowdowns (the
    original at 1.00x each) and the prefill's FLOPs ratio; no speed asserted."""
    from taylormlp.measure import engines
    from taylormlp.measure.engine_bench import run_engine_bench
    from taylormlp.measure.workload import Workload

    source = releases["paper"].parent / "src-paper"
    request = engines.BenchRequest(source, (releases["paper"],), batch_sizes=(3,), repeats=1, dtype="float32",
                                   json_path=tmp_path / "w.json", workload=Workload(40, 4))
    results = run_engine_bench(engines.get("vllm", "bench"), request, workdir=tmp_path)
    rows = {(r["batch"], r["name"]): r for r in results["rows"]}
    backend = "paper (Transformers backend)"
    assert set(rows) == {(b, n) for b in (1, 3) for n in ("original", "paper", backend)}
    assert all(rows[b, "original"][f"{p}_slowdown"] == 1.0 for b in (1, 3) for p in ("prefill", "decode", "request"))
    assert all(r["prefill_s"] > 0 and r["decode_s"] > 0 for r in rows.values())
    assert results["prompt_tokens"] == 40 and results["new_tokens"] == 4
    assert {m["name"]: m for m in results["models"]}["paper"]["prefill_flops_ratio"] > 1.0
    assert json.loads((tmp_path / "w.json").read_text())["workload"] == {"prompt_tokens": 40, "new_tokens": 4}


def test_protect_slowdown_engine_vllm_dials_on_the_engine(releases, tmp_path):
    """The engine dial end to end on a tiny model (nothing here asserts a speed): throttle.choose_slowdown measuring with
    engine_dial.EngineDial on vLLM from the registry (eager, float32, short runs, one round: the setting vLLM's
    prior picks): every read comes from vLLM, the record and the card name the engine, and closing the dial stops
    every engine and deletes every candidate (its log stays)."""
    from taylormlp.measure.throughput import measure_prompt_ids
    from taylormlp.protection import flow
    from taylormlp.protection.calibration import calibrate
    from taylormlp.protection.options import ProtectOptions
    from taylormlp.protection.throttle import choose_slowdown
    from taylormlp.measure import engines
    from taylormlp.protection.engine_dial import EngineDial
    from taylormlp.release.card import model_card
    from taylormlp.release.sources import load_base

    source = releases["pieces"].parent / "src-pieces"
    model, tok, _ = load_base(source)
    dial = EngineDial(engines.get("vllm", "protect"), source, tok, measure_prompt_ids(tok, True)[0].tolist(),
                      dtype="float32", eager=True, tokens=4, repeats=1, workdir=tmp_path / "dial")
    try:
        opts = ProtectOptions(preset="default", order=8, **FAST).resolved()
        data, ranges = calibrate(model, tok, None, opts, True)
        setting = choose_slowdown(model, tok, True, (data, ranges), opts, 2.0, measure=dial, rounds=1, serving_batch=2)
        spec, slow = flow.finish(setting, data, ranges).to_dict(), setting.slowdown.to_dict()
        assert dial.candidate is not None and dial.original.child.poll() is None  # kept loaded across reads
    finally:
        dial.close()
    left = [d for d in (tmp_path / "dial").glob("candidate-*") if d.is_dir()]
    assert dial.original is None and dial.candidate is None and not left
    engine = slow["engine"]
    assert engine["name"] == "vllm" and engine["version"] and engine["mode"] == "eager" and engine["dtype"] == "float32"
    assert engine["release_class"] == NATIVE  # the candidates ran as native vLLM models
    assert [p["batch"] for p in slow["curve"]] == [1, 2, 8, 32] and all(p["measured"] > 0 for p in slow["curve"])
    assert len(slow["reads"]) >= 2 and isinstance(slow["curve_agrees"], bool)
    assert f"vLLM {engine['version']} (eager, float32)" in model_card(spec, slowdown=slow)


def test_compare_engine_vllm_generates_what_our_runtime_does_in_float32(releases, smol_tokenizer, tmp_path):
    """`compare --engine vllm --dtype float32`: both models on vLLM, every prompt in one batch, each continuation cut
    after EOS; in float32 each side's tokens are our runtime's greedy tokens, so the count of identical rows is
    theirs."""
    from taylormlp.measure import engines
    from taylormlp.measure.generate import encode_prompt, eos_ids, until_eos
    from taylormlp.release.sources import load_base

    source = releases["paper"].parent / "src-paper"
    prompts = ({"kind": "raw", "text": "The cat sat on"}, {"kind": "chat", "text": "Name a colour."},
               {"kind": "raw", "text": "1, 2, 3,"})
    result = engines.get("vllm", "compare").compare(
        engines.CompareRequest(source, releases["paper"], prompts, NEW, "float32"))
    models, same = (load_base(source)[0], load_release(releases["paper"])), 0
    eos = eos_ids(smol_tokenizer, models[0])  # the tokenizer's and the original's generation config's
    for item, row in zip(prompts, result["rows"]):
        ids = encode_prompt(smol_tokenizer, item["text"], item["kind"] == "chat")
        ours = [until_eos(greedy(model, ids, NEW).new[0].tolist(), eos) for model in models]
        assert row["original"] == smol_tokenizer.decode(ours[0], skip_special_tokens=True)
        assert row["release"] == smol_tokenizer.decode(ours[1], skip_special_tokens=True)
        same += ours[0] == ours[1]
    assert result["identical"] == same and result["engine"]["dtype"] == "float32"
