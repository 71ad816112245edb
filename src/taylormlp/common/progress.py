"""Progress reporting: tqdm bars on stderr, silenced with TAYLORMLP_QUIET=1 (tests) or when not a TTY-friendly run."""

from __future__ import annotations

import contextlib
import os
import sys
import time

from tqdm.auto import tqdm


def quiet() -> bool:
    return os.environ.get("TAYLORMLP_QUIET") == "1"


def bar(iterable=None, **kwargs):
    kwargs.setdefault("disable", quiet())
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def log(message: str) -> None:
    if not quiet():
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def status(message: str):
    start = time.perf_counter()
    log(f"{message} ...")
    yield
    log(f"{message}: done in {time.perf_counter() - start:.1f}s")
