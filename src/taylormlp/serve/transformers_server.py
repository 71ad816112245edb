"""`taylormlp serve`: an OpenAI-compatible server for one release, on transformers' own serving engine.

transformers' `serve` (transformers.cli.serving) is the engine: its FastAPI app and handlers answer /v1/models,
/v1/chat/completions, /v1/completions and /v1/responses (streaming or not), and its continuous batching (paged
attention, on CPU as well) puts concurrent requests into shared decode steps.  What it cannot do alone is load a
release: it builds getattr(transformers, config.architectures[0]), a stock class that refuses a release
(runtime.LOAD_NOTICE).  The one hook used here is the loader, replaced by load_release and pinned to the release
(transformers' `force_model`); the handlers, the app and the batching engine are transformers' own.

Two generations of transformers' serving are supported (tested on 5.19 and 5.25), told apart by what
transformers.cli.serving.model_manager holds, not by version numbers:

- up to 5.24, the ModelManager loads each model in the server's process (`_load_model`), and the GenerationState
  runs the continuous batching worker in a thread of it;
- from 5.25 (ENGINE_PROCESS), each model runs in a process of its own (spawned): a ModelLoader loads it there, an
  EngineClient carries the requests to it, and the batching worker is a thread of that process.

Nothing of the serve extra (fastapi, uvicorn, openai) is imported before `require_serve_extra` has checked it.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import importlib.util
import inspect
import math
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from transformers import AutoTokenizer
from transformers.cli.serving import model_manager as _serving_models
from transformers.cli.serving.model_manager import ModelManager

from ..common.errors import TaylorMLPError
from ..release.directory import load_release
from ..release.sources import load_base, resolve_source

# what transformers' serving needs (transformers.utils.import_utils.is_serve_available), by import name
SERVE_PACKAGES = ("fastapi", "uvicorn", "openai", "pydantic")
INSTALL_SERVE = "pip install 'taylormlp[serve]' (in a checkout: pip install -e '.[serve]')"
PAGE_TOKENS = 256  # transformers' ContinuousBatchingConfig.page_size default: the KV cache is allocated in pages
# transformers >= 5.25: each model runs in a process of its own, loaded there by a ModelLoader (see the docstring)
ENGINE_PROCESS = hasattr(_serving_models, "ModelLoader")


def require_serve_extra(what: str = "`taylormlp serve`") -> None:
    """A TaylorMLPError naming the pip command if a package of the serve extra is missing (`what` needs it)."""
    missing = [name for name in SERVE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise TaylorMLPError(f"{what} needs the serve extra ({', '.join(missing)} not installed): {INSTALL_SERVE}")


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


def load_verified_release(directory):
    """A release verified (release.verify_release) before serving, loaded without hashing it again."""
    return load_release(directory, verify=False)


def load_original(directory):
    """An original model directory, loaded as every taylormlp command loads an original (sources.load_base)."""
    return load_base(directory)[0]


class _PinnedToRelease:
    """What both generations of the hook share: the release (`release`, loaded by `load`: load_verified_release, or
    for the benchmark's original load_original), served as `name` and refusing any other name; `threads`, if set,
    the torch threads of the process that runs the model."""

    def _pin(self, release, name: str, load, threads: int | None) -> None:
        self.release, self.name, self.load, self.threads = Path(release), name, load, threads

    def _refuse_others(self, model_id) -> None:
        if model_id is not None and model_id != self.name:
            raise ValueError(f"this server serves only the TaylorMLP release {self.name!r}, not {model_id!r}")

    def _tokenizer(self, model_id):
        self._refuse_others(model_id)
        return AutoTokenizer.from_pretrained(self.release)

    def _model(self, model_id):
        self._refuse_others(model_id)
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        return self.load(self.release)

    def _listing(self, loaded: bool) -> list[dict]:
        return [{"id": self.name, "object": "model", "created": 0, "owned_by": "local",
                 "status": {"value": "loaded" if loaded else "unloaded"}}]


if ENGINE_PROCESS:  # transformers >= 5.25: the model runs in a process of its own
    from transformers.cli.serving.model_manager import EngineClient, ModelLoader
    from transformers.cli.serving.utils import ModelNotServedError, canonical_model_id

    class ReleaseModelLoader(_PinnedToRelease, ModelLoader):
        """transformers' ModelLoader for one release.  It is pickled into the model's process, which calls
        `load_model_and_processor` (so `_load_model` runs there); the server's process reads only the config and the
        tokenizer (`load_config`, `load_processor`)."""

        def __init__(self, release, name: str, load, threads: int | None = None):
            self._pin(release, name, load, threads)
            super().__init__(device="cpu")

        def _refuse_others(self, model_id) -> None:
            # the model's process gets canonical_model_id(name) ("name@main"), the server's process the name
            super()._refuse_others(self.name if model_id == canonical_model_id(self.name) else model_id)

        def load_config(self, model_id):
            self._refuse_others(model_id)
            return super().load_config(str(self.release))

        def load_processor(self, model_id):
            return self._tokenizer(model_id)

        def _load_model(self, model_id, tqdm_class=None, progress_callback=None):
            # In the model's process, which transformers stops with SIGTERM: tqdm's default lock, a multiprocessing
            # semaphore, would then be left behind and reported leaked at exit.  A thread lock is all tqdm needs here.
            from tqdm import tqdm

            tqdm.set_lock(threading.RLock())
            return self._model(model_id)

    class ReleaseModelManager(_PinnedToRelease, ModelManager):
        """transformers' ModelManager for one release: its model's process starts now and is never stopped for
        being idle; after a POST /reset it starts again with the next request, from the same directory.  The engine
        goes by `name` itself (transformers would name it canonical_model_id(name): "name@main", or a path of that
        name in the working directory)."""

        def __init__(self, release, name: str, generation_state, load=load_verified_release, threads=None):
            self._pin(release, name, load, threads)
            super().__init__(ReleaseModelLoader(release, name, load, threads), generation_state, model_timeout=-1,
                             force_model=name)

        def preload_engine(self, force_model: str, engine_connection=None) -> None:
            engine = EngineClient(self.name, self.loader, self.generation_state, connection=engine_connection)
            self.engines[self.name] = engine
            try:
                engine.start()
            except RuntimeError as exc:  # the model's process sends its error back as "<type>: <message>"
                prefix = f"{TaylorMLPError.__name__}: "
                if str(exc).startswith(prefix):
                    raise TaylorMLPError(str(exc)[len(prefix):]) from None
                raise

        def get_engine(self, model):
            if model is not None and model != self.name:
                raise ModelNotServedError(f"this server serves only the TaylorMLP release {self.name!r}, not "
                                          f"{model!r}")
            return self.engines[self.name]

        def list_models(self, cache_dir=None) -> list[dict]:
            return self._listing(self.loaded)

        @property
        def loaded(self) -> bool:
            return any(engine.process_running for engine in self.engines.values())

        def batching(self, state) -> bool:
            """Whether continuous batching runs the release's requests: the model's process is alive, and generates
            through transformers' CBGenerateRunner, whose batching worker starts with that process."""
            engine = self.engines.get(self.name)
            process = engine and engine.managed_process
            return bool(process is not None and process.is_alive() and engine.use_cb)

        def shutdown(self) -> None:
            """Stops the model's process (transformers: SIGTERM, then SIGKILL after 5 s) and waits until it is gone."""
            processes = [engine.managed_process for engine in self.engines.values()
                         if engine.managed_process is not None]
            super().shutdown()
            from multiprocessing.connection import wait

            for process in processes:  # its sentinel, not join(): transformers' own thread reaps it
                wait([process.sentinel], timeout=30)

else:  # transformers 5.16 to 5.24: the model is loaded in the server's process

    class ReleaseModelManager(_PinnedToRelease, ModelManager):
        """transformers' ModelManager for one release, loaded now and never unloaded (transformers' `force_model`).
        After a POST /reset it is loaded again with the next request, from the same directory."""

        def __init__(self, release, name: str, generation_state, load=load_verified_release, threads=None):
            self._pin(release, name, load, threads)
            super().__init__(device="cpu", force_model=name)

        @staticmethod
        def process_model_name(model_id: str) -> str:
            return model_id  # the served name as it is (transformers appends "@main" to a Hub repository's name)

        def _load_processor(self, model_id_and_revision, gguf_file=None):
            return self._tokenizer(model_id_and_revision)

        def _load_model(self, model_id_and_revision, tqdm_class=None, progress_callback=None, gguf_file=None):
            return self._model(model_id_and_revision)

        def list_models(self, cache_dir=None) -> list[dict]:
            return self._listing(self.loaded)

        get_gen_models = list_models  # what /v1/models calls in older releases (5.19: every model of the Hub cache)

        @property
        def loaded(self) -> bool:
            return bool(self.loaded_models)

        def batching(self, state) -> bool:
            """Whether continuous batching runs the release's requests: transformers starts its batching worker, a
            thread of this process, with the first request."""
            worker = state._cb_manager
            return worker is not None and worker.is_alive()


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

    # transformers 5.16 calls the page size `block_size`; later releases `page_size` (`block_size` a deprecated alias)
    fields = {field.name for field in dataclasses.fields(ContinuousBatchingConfig)}
    size = "page_size" if "page_size" in fields else "block_size"
    return ContinuousBatchingConfig(**{size: PAGE_TOKENS}, num_blocks=math.ceil(kv_cache_tokens / PAGE_TOKENS),
                                    max_batch_tokens=max_batch_tokens)


def _accepted(function, kwargs: dict) -> dict:
    """The `kwargs` that `function` takes: the arguments of transformers' serving classes change between releases
    (TranscriptionHandler and build_server take the GenerationState up to 5.24, not from 5.25)."""
    parameters = inspect.signature(function).parameters
    return {name: value for name, value in kwargs.items() if name in parameters}


def build_app(manager, state):
    """transformers' serve app on `manager`, with `state` (its GenerationState), wired as `transformers serve` wires
    it (transformers/cli/serve.py)."""
    from openai.types import completion_create_params as completion_params
    from openai.types.chat import completion_create_params as chat_params
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.transcription import TranscriptionHandler

    common = dict(model_manager=manager, generation_state=state)
    handlers = dict(completion_handler=checked(CompletionHandler, completion_params)(**common),
                    response_handler=ResponseHandler(**common),
                    transcription_handler=TranscriptionHandler(**_accepted(TranscriptionHandler, common)),
                    generation_state=state)
    if importlib.util.find_spec("transformers.cli.serving.systemone") is not None:  # /v1/systemone, from 5.24
        from transformers.cli.serving.systemone import SystemOneHandler

        handlers["systemone_handler"] = SystemOneHandler(**common)
    return build_server(manager, checked(ChatCompletionHandler, chat_params)(**common),
                        **_accepted(build_server, handlers))


class ReleaseServer:
    """A release behind transformers' serve app on uvicorn: `run()` serves until Ctrl-C / SIGTERM (in the main
    thread) or `stop()` (from another thread), then stops the batching worker (and from transformers 5.25 the
    model's process).

    Served as `name` (default: the release directory's name).  `original=True` is for `taylormlp bench
    --serve-concurrency` only (`taylormlp serve` serves releases): `release` is then an original model SOURCE,
    loaded by sources.load_base, behind the same app and batching, so that its throughput is the reference.
    `threads`: the torch threads of the process that runs the model (default: torch's)."""

    def __init__(self, release, host: str = "127.0.0.1", port: int = 8000, batching: str = "continuous",
                 kv_cache_tokens: int = 8192, max_batch_tokens: int = 256, name: str | None = None,
                 original: bool = False, threads: int | None = None):
        import uvicorn
        from transformers.cli.serving.utils import GenerationState

        directory = resolve_source(release) if original else Path(release)
        self.release, self.batching = release, batching
        self.name = name or directory.resolve().name
        self.url = f"http://{host}:{port}"
        self.state = GenerationState(continuous_batching=batching == "continuous",
                                     cb_config=batching_config(kv_cache_tokens, max_batch_tokens))
        self.manager = ReleaseModelManager(directory, self.name, self.state, threads=threads,
                                           load=load_original if original else load_verified_release)
        self.app = build_app(self.manager, self.state)
        watch = {}
        if ENGINE_PROCESS:  # as `transformers serve`: stop if the model's process died (checked every 5 s)
            async def stop_if_the_model_died():
                if self.manager.is_dead:
                    self.server.should_exit = True

            watch = dict(callback_notify=stop_if_the_model_died, timeout_notify=5)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=host, port=port, log_level="warning", **watch))

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
            if hasattr(self.state, "shutdown"):  # up to 5.24 the batching worker is a thread of this process
                self.state.shutdown()
            self.manager.shutdown()  # from 5.25 it stops the model's process, and the batching worker in it
        if getattr(self.manager, "is_dead", False):
            raise TaylorMLPError(f"the process running {self.name!r} died (its error is above); the server stopped")
        print("server stopped", file=sys.stderr, flush=True)

    def stop(self) -> None:
        self.server.should_exit = True

    def is_batching(self) -> bool:
        """Whether continuous batching runs this server's requests, with its worker alive."""
        return self.manager.batching(self.state)

    def is_loaded(self) -> bool:
        """Whether the model is loaded (from 5.25: whether its process runs)."""
        return self.manager.loaded
