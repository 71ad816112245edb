"""`taylormlp bench --serve-concurrency`: throughput through the server (issue 17, item 3, server mode).

The load generator (serve_bench.drive) against a tiny release served in a thread (serve.ReleaseServer, continuous
batching): every request decodes the tokens asked for, the prompt is the chat-templated prompt, and the clients are
in flight together.  An original served the same way (ReleaseServer(original=True)) whose greedy token is its EOS:
EOS stops a plain request at once, and the benchmark's requests (EOS ignored) still decode every token asked for.
The rows and the slowdown from injected timings; the interleaving; run_bench's server mode end to end with the
servers in threads; and with the real server processes (slow: each imports the serving stack).
"""

from __future__ import annotations

import contextlib
import json
import threading

import pytest
import torch

from openai import OpenAI

from taylormlp.measure import bench

from taylormlp.serve import transformers_server as serve

from taylormlp.measure import serve_bench
from taylormlp.common.errors import TaylorMLPError

from conftest import free_port, tiny_llama

PROMPT = "Why is the sky blue?"


@contextlib.contextmanager
def in_threads(targets: dict, kv_tokens: int = 2048, threads: int = 1):
    """serve_bench.served_models' contract with the servers in this process's threads: {name: url}."""
    servers, workers = {}, []
    try:
        for name, (kind, path) in targets.items():
            srv = serve.ReleaseServer(path, port=free_port(), kv_cache_tokens=kv_tokens, max_batch_tokens=128,
                                      name=name, original=kind == "original")
            worker = threading.Thread(target=srv.run, name=f"serve-{name}", daemon=True)
            worker.start()
            servers[name], workers = srv, [*workers, worker]
        for srv, worker in zip(servers.values(), workers):
            while not serve_bench.is_up(srv.url):
                assert worker.is_alive(), "a server ended before answering"
                threading.Event().wait(0.1)
        yield {name: srv.url for name, srv in servers.items()}
    finally:
        for srv in servers.values():
            srv.stop()
        for worker in workers:
            worker.join(timeout=60)


@pytest.fixture(scope="module")
def served_release(tiny_release):
    with in_threads({"rel": ("release", tiny_release)}) as urls:
        yield urls["rel"]


def test_drive_decodes_the_tokens_asked_for_with_every_client_in_flight(served_release, smol_tokenizer):
    prompt_len = len(smol_tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                                        add_generation_prompt=True, tokenize=True,
                                                        return_dict=True)["input_ids"])
    for clients, requests in ((1, 2), (3, 2)):
        run = serve_bench.drive(served_release, "rel", PROMPT, True, clients, requests, 6)
        records = run["records"]
        assert len(records) == run["requests"] == clients * requests
        assert [(r["tokens"], r["prompt_tokens"]) for r in records] == [(6, prompt_len)] * len(records)
        assert run["output_tokens"] == run["tokens_requested"] == 6 * clients * requests
        assert run["peak_in_flight"] == clients
        last_end = max(r["end_s"] for r in records)
        assert 0 <= min(r["start_s"] for r in records) and last_end <= run["wall_s"]
        assert run["requests_per_s"] == pytest.approx(len(records) / run["wall_s"])
        assert run["output_tokens_per_s"] == pytest.approx(6 * len(records) / run["wall_s"])
        for r in records:
            assert r["start_s"] < r["first_s"] <= r["last_s"] <= r["end_s"]
        assert 0 < run["ttft_s"] < last_end and 0 < run["inter_token_s"] < last_end


def test_raw_completions_endpoint(served_release):
    run = serve_bench.drive(served_release, "rel", PROMPT, False, 2, 1, 4)
    assert [r["tokens"] for r in run["records"]] == [4, 4] and run["peak_in_flight"] == 2


def test_an_original_served_the_same_way_decodes_past_its_eos(tmp_path, smol_tokenizer):
    """A random Llama whose final norm is zero: every logit is 0, its greedy token is id 0, which is its EOS."""
    model = tiny_llama(vocab=len(smol_tokenizer), tie_word_embeddings=True, eos_token_id=0,
                       bos_token_id=smol_tokenizer.bos_token_id)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.generation_config.eos_token_id = 0
    model.save_pretrained(tmp_path / "eos-first")
    smol_tokenizer.save_pretrained(tmp_path / "eos-first")
    with in_threads({"original": ("original", tmp_path / "eos-first")}) as urls:
        client = OpenAI(base_url=f"{urls['original']}/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["original"]
        plain = client.chat.completions.create(model="original", messages=[{"role": "user", "content": PROMPT}],
                                               max_tokens=5, temperature=0)
        assert plain.usage.completion_tokens == 1 and plain.choices[0].finish_reason == "stop"
        run = serve_bench.drive(urls["original"], "original", PROMPT, True, 2, 1, 5)
    assert [r["tokens"] for r in run["records"]] == [5, 5]


def test_peak_in_flight_counts_overlapping_requests():
    def req(start, end):
        return {"start_s": start, "end_s": end}

    assert serve_bench.peak_in_flight([req(0, 1), req(1, 2), req(2, 3)]) == 1  # back to back
    assert serve_bench.peak_in_flight([req(0, 3), req(1, 2), req(1.5, 4), req(3.5, 5)]) == 3


def fake_run(tokens_per_s: float, ttft_s: float = 0.1, requests: int = 4, tokens: int = 8) -> dict:
    wall = requests * tokens / tokens_per_s
    return {"requests": requests, "wall_s": wall, "requests_per_s": requests / wall, "output_tokens": requests * tokens,
            "tokens_requested": requests * tokens, "output_tokens_per_s": tokens_per_s, "ttft_s": ttft_s,
            "inter_token_s": 0.01, "peak_in_flight": 2, "records": []}


def test_serve_rows_slowdown_from_injected_timings():
    """The slowdown is the original's output tokens/s over the release's, per round; median and range over rounds."""
    timings = {8: {"original": [fake_run(100), fake_run(90), fake_run(120)],
                   "rel": [fake_run(20), fake_run(30), fake_run(20)]},
               1: {"original": [fake_run(40, 0.05)] * 3, "rel": [fake_run(10, 0.2)] * 3}}
    rows = serve_bench.serve_rows(timings, "original")
    assert [(r["concurrency"], r["name"], r["kind"]) for r in rows] == [
        (1, "original", "original"), (1, "rel", "release"), (8, "original", "original"), (8, "rel", "release")]
    one, eight = rows[1], rows[3]
    assert (one["slowdown"], one["slowdown_min"], one["slowdown_max"]) == pytest.approx((4.0, 4.0, 4.0))
    assert one["ttft_ms"] == pytest.approx(200) and one["throughput_vs_original"] == pytest.approx(0.25)
    assert (eight["slowdown"], eight["slowdown_min"], eight["slowdown_max"]) == pytest.approx((5.0, 3.0, 6.0))
    assert eight["output_tokens_per_s"] == 20 and rows[2]["output_tokens_per_s"] == 100
    assert rows[2]["slowdown"] == 1.0 and eight["tokens_per_request"] == eight["tokens_requested_per_request"] == 8
    assert eight["requests_per_s"] == pytest.approx(20 / 8)


def test_serve_timings_interleave_every_model_and_concurrency():
    calls = []

    def run(url, name, prompt, chat, clients, requests, tokens):
        calls.append((clients, name))
        assert (url, prompt, chat, requests, tokens) == (f"u-{name}", PROMPT, True, 2, 5)
        return len(calls)

    options = serve_bench.ServeOptions(concurrency=(1, 8, 1), requests=2, tokens=5)
    timings = serve_bench.serve_timings({"original": "u-original", "rel": "u-rel"}, PROMPT, True, options, 2, run)
    keys = [(1, "original"), (1, "rel"), (8, "original"), (8, "rel")]
    assert calls == keys + keys + keys[1:] + keys[:1]  # a warm-up each, then rounds with the first one rotated
    assert timings == {1: {"original": [5, 12], "rel": [6, 9]}, 8: {"original": [7, 10], "rel": [8, 11]}}


def test_kv_cache_holds_every_client_twice():
    assert serve_bench.kv_cache_tokens(8, 40, 16) == 8192  # `taylormlp serve`'s default is enough
    assert serve_bench.kv_cache_tokens(64, 300, 100) == 2 * 64 * 512


def test_refused_before_anything_is_loaded(monkeypatch):
    with pytest.raises(TaylorMLPError, match="serves on the CPU"):
        serve_bench.check_serve_options(serve_bench.ServeOptions((1,)), "cuda")
    monkeypatch.setattr(serve, "SERVE_PACKAGES", ("fastapi", "no_such_serving_package"))
    with pytest.raises(TaylorMLPError, match=r"^--serve-concurrency needs the serve extra \(no_such_serving_package"):
        serve_bench.check_serve_options(serve_bench.ServeOptions((1,)), "cpu")


def test_run_bench_server_mode_end_to_end(tiny_llama_dir, tiny_release, tmp_path, capsys, monkeypatch):
    """run_bench's server mode with the servers in threads: the original served from SOURCE, the release from its
    directory, one row per concurrency and model, the table printed and the JSON written."""
    started = {}

    def served_models(targets, kv_tokens, threads):
        started.update(targets, kv_tokens=kv_tokens)
        return in_threads(targets, kv_tokens, threads)

    monkeypatch.setattr(serve_bench, "served_models", served_models)
    results = bench.run_bench(tiny_llama_dir, [tiny_release], tokens=1, repeats=1, memory=False,
                              json_path=tmp_path / "b.json",
                              serve={"concurrency": (2, 1), "requests": 1, "tokens": 3})
    assert started == {"original": ("original", str(tiny_llama_dir)), tiny_release.name: ("release",
                                                                                         str(tiny_release)),
                       "kv_tokens": 8192}
    section = results["serve"]
    assert section["concurrency"] == [1, 2] and section["max_tokens"] == 3 and section["endpoint"] == "chat"
    rows = section["rows"]
    assert [(r["concurrency"], r["name"]) for r in rows] == [(c, n) for c in (1, 2)
                                                             for n in ("original", tiny_release.name)]
    for r in rows:
        assert r["tokens_per_request"] == 3 and r["peak_in_flight"] == r["concurrency"] and len(r["runs"]) == 1
    assert json.loads((tmp_path / "b.json").read_text())["serve"]["rows"][3]["name"] == tiny_release.name
    out = capsys.readouterr().out
    assert "through the server (chat endpoint" in out and "tok/s (all)" in out


@pytest.mark.slow
def test_bench_serve_concurrency_through_server_processes(tiny_llama_dir, tiny_release, tmp_path, capsys):
    """The command as typed: one `taylormlp serve`-engine process per model (serve_bench.server_main), stopped
    afterwards."""
    from taylormlp.cli import main

    code = main(["bench", str(tiny_llama_dir), str(tiny_release), "--tokens", "1", "--repeats", "1",
                 "--serve-concurrency", "1", "2", "--serve-tokens", "3", "--json", str(tmp_path / "b.json")])
    assert code == 0
    rows = json.loads((tmp_path / "b.json").read_text())["serve"]["rows"]
    assert [(r["concurrency"], r["tokens_per_request"], r["peak_in_flight"]) for r in rows] == [
        (1, 3, 1), (1, 3, 1), (2, 3, 2), (2, 3, 2)]
    assert "through the server" in capsys.readouterr().out
