"""transformers' own server as an engine (measure/engines.py), for `taylormlp serve`: its OpenAI-compatible app and
continuous batching, the release loaded by our loader (serve/transformers_server.py).  It needs the serve extra, so
the server module is imported when asked for, not before."""

from __future__ import annotations

from ..release.directory import verify_release
from .engines import ServeRequest


def _server():
    """serve/transformers_server, checked to have the serve extra it imports."""
    from ..serve import transformers_server  # imports transformers' serving engine, of the optional serve extra

    transformers_server.require_serve_extra()
    return transformers_server


class TransformersEngine:
    name = "transformers"

    def require(self) -> None:
        _server()

    def serve(self, request: ServeRequest) -> int:
        server = _server()
        server.check_address(request.host, request.port)
        verify_release(request.release)
        server.ReleaseServer(request.release, host=request.host, port=request.port, batching=request.batching,
                             kv_cache_tokens=request.kv_cache_tokens, max_batch_tokens=request.max_batch_tokens).run()
        return 0


ENGINE = TransformersEngine()
