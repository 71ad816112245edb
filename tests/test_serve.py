"""`taylormlp serve`: a release behind transformers' OpenAI-compatible server (issue 17, item 2).

A server on a tiny release (serve.ReleaseServer in a thread, continuous batching), driven by the `openai` client:
/v1/models lists the release; concurrent greedy chats, a streamed chat and a raw completion return what
load_release + generate return on the same chat template; malformed requests get a 4xx and the server keeps
answering; stop() ends it and its batching worker.  Then the command itself (`taylormlp serve`, the sequential
engine) in the main thread, stopped by Ctrl-C; and the up-front refusals (extra missing, port taken).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from openai import OpenAI

try:  # the HTTP client openai uses (httpx2 in newer releases)
    import httpx2 as httpx
except ImportError:  # pragma: no cover - older openai releases
    import httpx

from taylormlp.serve import transformers_server as serve
from taylormlp.cli import main
from taylormlp.protection.flow import protect_to_release
from taylormlp.measure.generate import generate_ids
from taylormlp.release.sources import load_any

from conftest import FAST, free_port, save_tiny_chat_model

PROMPTS = ["Hello there", "What is 2+2?", "Tell me a story about a cat", "Name a colour."]
TOKENS = 10
STARTUP_S = 180  # a fresh interpreter imports torch, transformers and the serving stack on a shared machine


@pytest.fixture(scope="module")
def chatty_release(tmp_path_factory, smol_tokenizer):
    """A tiny release whose greedy chats differ from prompt to prompt (the shared `tiny_release` answers every chat
    prompt with one repeated token, which could not tell one request's answer from another's)."""
    src = save_tiny_chat_model(tmp_path_factory.mktemp("chatty") / "src", smol_tokenizer, attention_scale=10.0)
    out = tmp_path_factory.mktemp("chatty-rel") / "chatty"
    protect_to_release(src, out, preset="default", order=8, coverage=1.0, calibration_samples=4, **FAST)
    return out


@pytest.fixture(scope="module")
def reference(chatty_release):
    """load_release + generate on the chat template: {prompt: (text, new tokens, prompt tokens)}, and the raw
    completion of PROMPTS[0]."""
    model, tokenizer = load_any(chatty_release)
    out = {}
    for chat, prompts in ((True, PROMPTS), (False, PROMPTS[:1])):
        for prompt in prompts:
            new, prompt_len = generate_ids(model, tokenizer, prompt, chat=chat, max_new_tokens=TOKENS)
            out[chat, prompt] = tokenizer.decode(new, skip_special_tokens=True), int(new.numel()), prompt_len
    return out


def wait_until_up(url: str, alive, timeout_s: float = 120) -> None:
    """Until GET /health answers 200 (`alive()` false: the server ended first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert alive(), "the server ended before answering"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} did not answer within {timeout_s} s")


@pytest.fixture(scope="module")
def server(chatty_release):
    """(ReleaseServer with continuous batching, its thread, openai client) on the chatty release."""
    srv = serve.ReleaseServer(chatty_release, port=free_port(), kv_cache_tokens=2048, max_batch_tokens=128)
    thread = threading.Thread(target=srv.run, name="serve-test", daemon=True)
    thread.start()
    wait_until_up(srv.url, thread.is_alive)
    yield srv, thread, OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=120)
    srv.stop()
    thread.join(timeout=60)


def chat(client, name, prompt, **kwargs):
    return client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=TOKENS, temperature=0, **kwargs)


def test_models_lists_the_release(server, chatty_release):
    client = server[2]
    assert [m.id for m in client.models.list().data] == [chatty_release.name]


def test_concurrent_greedy_chats_are_load_release_generations(server, chatty_release, reference):
    client = server[2]
    expected = [reference[True, p] for p in PROMPTS]
    assert len({text for text, _, _ in expected}) == len(PROMPTS)  # a mixed-up answer would show
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(lambda p: chat(client, chatty_release.name, p), PROMPTS))
    for answer, (text, n_new, n_prompt) in zip(answers, expected):
        assert answer.choices[0].message.content == text
        assert (answer.usage.completion_tokens, answer.usage.prompt_tokens) == (n_new, n_prompt)
        assert answer.model == chatty_release.name


def test_streamed_chat_is_the_same_text(server, chatty_release, reference):
    client = server[2]
    chunks = list(chat(client, chatty_release.name, PROMPTS[2], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 2 and text == reference[True, PROMPTS[2]][0]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completion_of_a_raw_prompt(server, chatty_release, reference):
    client = server[2]
    answer = client.completions.create(model=chatty_release.name, prompt=PROMPTS[0], max_tokens=TOKENS,
                                       temperature=0)
    assert answer.choices[0].text == reference[False, PROMPTS[0]][0]


MALFORMED = {
    "not JSON": "{bad json",
    "no messages": {"model": "chatty"},
    "messages not a list": {"model": "chatty", "messages": "hi"},
    "message without content": {"model": "chatty", "messages": [{"role": "user"}]},
    "unknown role": {"model": "chatty", "messages": [{"role": "wizard", "content": "hi"}]},
    "max_tokens not a number": {"model": "chatty", "messages": [{"role": "user", "content": "hi"}],
                                "max_tokens": "many"},
    "a field OpenAI lacks": {"model": "chatty", "messages": [{"role": "user", "content": "hi"}], "bogus": 1},
    "another model": {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]},
}


def test_malformed_requests_get_a_4xx_and_the_server_keeps_answering(server, chatty_release, reference):
    url, client = server[0].url, server[2]
    for what, body in MALFORMED.items():
        content = body if isinstance(body, str) else json.dumps(body)
        reply = httpx.post(f"{url}/v1/chat/completions", content=content, timeout=60,
                           headers={"content-type": "application/json"})
        assert 400 <= reply.status_code < 500, (what, reply.status_code, reply.text[:300])
        if "messages" in what or "content" in what or "role" in what or "max_tokens" in what:
            assert "malformed request" in reply.text, (what, reply.text[:300])
    reply = httpx.post(f"{url}/v1/completions", json={"model": "chatty", "prompt": 5}, timeout=60)
    assert reply.status_code == 422 and "prompt" in reply.text
    assert chat(client, chatty_release.name, PROMPTS[1]).choices[0].message.content == reference[True, PROMPTS[1]][0]


def test_stop_ends_the_server_and_its_batching_worker(server):
    """Defined last of the tests on the module's server: it is stopped here."""
    srv, thread, _ = server
    assert srv.is_batching() and srv.is_loaded()  # the requests went through the batcher, whose worker runs
    srv.stop()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert not srv.is_batching() and not srv.is_loaded()  # the worker (from transformers 5.25: the model's process)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{srv.url}/health", timeout=2)


def test_taylormlp_serve_answers_then_stops_on_ctrl_c(chatty_release, reference, capsys):
    """The command itself, in this process's main thread: verify, load, serve, and Ctrl-C (SIGINT) exits 0."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    seen = {}

    def client():
        try:
            wait_until_up(url, lambda: True, timeout_s=120)
            answer = chat(OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120),
                          chatty_release.name, PROMPTS[0])
            seen["text"] = answer.choices[0].message.content
        finally:
            os.kill(os.getpid(), signal.SIGINT)

    helper = threading.Thread(target=client, daemon=True)
    helper.start()
    code = main(["serve", str(chatty_release), "--port", str(port), "--batching", "sequential"])
    helper.join(timeout=60)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 0 and seen.get("text") == reference[True, PROMPTS[0]][0], err[-20:]
    assert err[-1] == "server stopped" and f"as model 'chatty' at {url}/v1 (sequential batching)" in "\n".join(err)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)


# ---------------------------------------------------------------- in-process: the sequential engine, refusals


def _serve(argv, capsys) -> tuple[int, list[str]]:
    code = main(["serve", *map(str, argv)])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_missing_serve_extra_says_which_pip_command_installs_it(tiny_release, monkeypatch, capsys):
    monkeypatch.setattr(serve, "SERVE_PACKAGES", ("fastapi", "no_such_serving_package"))
    code, lines = _serve([tiny_release], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "no_such_serving_package not installed" in lines[0] and "pip install 'taylormlp[serve]'" in lines[0]


def test_a_taken_port_is_refused_before_loading(tiny_release, monkeypatch, capsys):
    monkeypatch.setattr(serve, "ReleaseServer", lambda *a, **k: pytest.fail("the release was served"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, lines = _serve([tiny_release, "--port", port], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"taylormlp serve: error: --port {port}: cannot listen on 127.0.0.1:{port}")
