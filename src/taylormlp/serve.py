"""`taylormlp serve`: an OpenAI-compatible server for one release, on transformers' own serving engine.

transformers' `serve` (transformers.cli.serving) is the engine: its FastAPI app and handlers answer /v1/models,
/v1/chat/completions, /v1/completions and /v1/responses (streaming or not), and its continuous batching (paged
attention, on CPU as well) puts concurrent requests into shared decode steps.  What it cannot do alone is load a
release: its ModelManager builds getattr(transformers, config.architectures[0]), a stock class that refuses a
release (runtime.LOAD_NOTICE).  The one hook used here is a ModelManager whose loader is load_release, pinned to
the release (transformers' `force_model`); the handlers, the app and the batching engine are transformers' own.

Nothing of the serve extra (fastapi, uvicorn, openai) is imported before `require_serve_extra` has checked it.
"""

from __future__ import annotations

import errno
import functools
import importlib.util
import math
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from transformers import AutoTokenizer
from transformers.cli.serving.model_manager import ModelManager

from .errors import TaylorMLPError
from .release import load_release

# what transformers' serving needs (transformers.utils.import_utils.is_serve_available), by import name
SERVE_PACKAGES = ("fastapi", "uvicorn", "openai", "pydantic")
INSTALL_SERVE = "pip install 'taylormlp[serve]' (in a checkout: pip install -e '.[serve]')"
PAGE_TOKENS = 256  # transformers' ContinuousBatchingConfig.page_size default: the KV cache is allocated in pages


def require_serve_extra() -> None:
    """A TaylorMLPError naming the pip command if a package of the serve extra is missing."""
    missing = [name for name in SERVE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise TaylorMLPError(f"`taylormlp serve` needs the serve extra ({', '.join(missing)} not installed): "
                             f"{INSTALL_SERVE}")


def check_address(host: str, port: int) -> None:
    """--host resolves and --port is free on it, before the release is loaded (uvicorn would only say so after)."""
    def not_here(exc):
        return TaylorMLPError(f"--host {host}: not an address of this machine ({exc.strerror}); give one such as "
                              f"127.0.0.1 (this machine only) or 0.0.0.0 (every interface)")

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise not_here(exc) from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT port is free
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                raise not_here(exc) from None
            raise TaylorMLPError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror}); choose another "
                                 f"--port, or stop what is listening there") from None


class ReleaseModelManager(ModelManager):
    """transformers' ModelManager for one release: loaded by load_release, listed and requested as `name`.

    The release was verified (release.verify_release) before serving, so it is loaded without hashing it again;
    after a POST /reset it is loaded again from the same directory."""

    def __init__(self, release, name: str, **kwargs):
        self.release, self.name = Path(release), name
        super().__init__(force_model=name, **kwargs)  # loads the release now, never unloads it

    @staticmethod
    def process_model_name(model_id: str) -> str:
        return model_id  # the served name as it is (transformers appends "@main" to a Hub repository's name)

    def _refuse_others(self, model_id: str) -> None:
        if model_id != self.name:
            raise ValueError(f"this server serves only the TaylorMLP release {self.name!r}, not {model_id!r}")

    def _load_processor(self, model_id_and_revision, gguf_file=None):
        self._refuse_others(model_id_and_revision)
        return AutoTokenizer.from_pretrained(self.release)

    def _load_model(self, model_id_and_revision, tqdm_class=None, progress_callback=None, gguf_file=None):
        self._refuse_others(model_id_and_revision)
        return load_release(self.release, verify=False)


def _materialized(value, where: tuple = ()):
    """A validated request with pydantic's lazy iterators read out: an Iterable field of OpenAI's request types (the
    chat messages, their content parts) has each item validated only when it is read.  Raises
    (where, ValidationError) as a _Malformed."""
    from pydantic import ValidationError

    if isinstance(value, dict):
        return {key: _materialized(item, (*where, key)) for key, item in value.items()}
    if isinstance(value, (list, tuple, Iterator)):
        try:
            return [_materialized(item, (*where, i)) for i, item in enumerate(value)]
        except ValidationError as exc:
            raise _Malformed(where, exc) from None
    return value


class _Malformed(Exception):
    def __init__(self, where: tuple, error):
        super().__init__(where, error)
        self.where, self.error = where, error


@functools.lru_cache(maxsize=None)
def _schema(request_type):
    """pydantic's validator of one of openai's request types (built once: seconds)."""
    from pydantic import TypeAdapter

    return TypeAdapter(request_type)


class OpenAIRequestCheck:
    """A request body checked against the `openai` package's own request types (`params`: a completion_create_params
    module): a malformed one is a 422 naming the first bad field, before transformers' handler reads it (which
    answers a missing or mistyped field with a 500)."""

    def __init__(self, params):
        self.schemas = {False: _schema(params.CompletionCreateParamsNonStreaming),
                        True: _schema(params.CompletionCreateParamsStreaming)}

    def __call__(self, body: dict) -> None:
        from fastapi import HTTPException
        from pydantic import ValidationError

        try:
            _materialized(self.schemas[body.get("stream") is True].validate_python(body))
            return
        except ValidationError as exc:
            where, error = (), exc
        except _Malformed as exc:
            where, error = exc.where, exc.error
        first = error.errors(include_url=False)[0]
        field = ".".join(str(part) for part in (*where, *first["loc"])) or "body"
        raise HTTPException(status_code=422, detail=f"malformed request: {field}: {first['msg']} "
                                                    f"({error.error_count()} problem(s))")


def checked(handler_class, params):
    """`handler_class` (one of transformers' serving handlers) with each request checked by OpenAIRequestCheck(params)
    before the handler reads it."""
    check = OpenAIRequestCheck(params)

    class Checked(handler_class):
        def _validate_request(self, body: dict) -> None:
            super()._validate_request(body)  # transformers' check: no field OpenAI's API lacks
            check(body)

    Checked.__name__ = Checked.__qualname__ = "Checked" + handler_class.__name__
    return Checked


def batching_config(kv_cache_tokens: int, max_batch_tokens: int):
    """Continuous batching with a KV cache of at least `kv_cache_tokens` tokens.  Unbounded, transformers sizes it
    from free memory (60% of the RAM on a CPU), allocated up front."""
    from transformers import ContinuousBatchingConfig

    return ContinuousBatchingConfig(page_size=PAGE_TOKENS, num_blocks=math.ceil(kv_cache_tokens / PAGE_TOKENS),
                                    max_batch_tokens=max_batch_tokens)


def build_app(manager: ModelManager, continuous: bool, cb_config=None):
    """transformers' serve app on `manager`, wired as `transformers serve` wires it (transformers/cli/serve.py);
    returns (app, generation state)."""
    from openai.types import completion_create_params as completion_params
    from openai.types.chat import completion_create_params as chat_params
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.systemone import SystemOneHandler
    from transformers.cli.serving.transcription import TranscriptionHandler
    from transformers.cli.serving.utils import GenerationState

    state = GenerationState(continuous_batching=continuous, cb_config=cb_config)
    chat = checked(ChatCompletionHandler, chat_params)(model_manager=manager, generation_state=state)
    completion = checked(CompletionHandler, completion_params)(model_manager=manager, generation_state=state)
    app = build_server(manager, chat, completion_handler=completion,
                       response_handler=ResponseHandler(model_manager=manager, generation_state=state),
                       transcription_handler=TranscriptionHandler(manager, state),
                       systemone_handler=SystemOneHandler(model_manager=manager, generation_state=state),
                       generation_state=state)
    return app, state


class ReleaseServer:
    """A release behind transformers' serve app on uvicorn: `run()` serves until Ctrl-C / SIGTERM (in the main
    thread) or `stop()` (from another thread), then stops the batching worker."""

    def __init__(self, release, host: str = "127.0.0.1", port: int = 8000, batching: str = "continuous",
                 kv_cache_tokens: int = 8192, max_batch_tokens: int = 256):
        import uvicorn

        self.release, self.name, self.batching = release, Path(release).resolve().name, batching
        self.url = f"http://{host}:{port}"
        self.manager = ReleaseModelManager(release, self.name, device="cpu")
        self.app, self.state = build_app(self.manager, batching == "continuous",
                                         batching_config(kv_cache_tokens, max_batch_tokens))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=host, port=port, log_level="warning"))

    def run(self) -> None:
        print(f"serving {self.release} as model {self.name!r} at {self.url}/v1 ({self.batching} batching); Ctrl-C "
              f"stops", file=sys.stderr, flush=True)
        main = threading.current_thread() is threading.main_thread()
        if main:
            sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops it as Ctrl-C does
        try:
            self.server.run()  # on SIGINT / SIGTERM it finishes the requests in flight, then raises the signal again
        except KeyboardInterrupt:
            pass
        finally:
            if main:
                signal.signal(signal.SIGTERM, sigterm)
            self.state.shutdown()
            self.manager.shutdown()
        print("server stopped", file=sys.stderr, flush=True)

    def stop(self) -> None:
        self.server.should_exit = True
