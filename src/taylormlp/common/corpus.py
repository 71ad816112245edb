"""Real text that needs no download and is the same on every machine that runs this Python: the documentation strings
of standard-library modules.  Protect calibrates on PROSE_MODULES (protection/calibration.py), the audit's attacker
and evaluator read other modules (attacks/context.py), and bench's workloads cut their prompts from PROSE_MODULES
(measure/workload.py).
"""

from __future__ import annotations

import importlib
import inspect

PROSE_MODULES = (
    "json", "csv", "argparse", "logging", "pathlib", "collections", "functools", "itertools", "datetime",
    "decimal", "fractions", "statistics", "random", "textwrap", "string", "re", "shutil", "tempfile",
    "subprocess", "threading", "queue", "heapq", "bisect", "dataclasses", "enum", "typing", "contextlib",
    "unittest", "doctest", "difflib", "calendar", "zipfile", "tarfile", "gzip", "sqlite3", "email",
    "http.client", "urllib.parse", "socket", "asyncio", "inspect", "pickle", "copy", "pprint", "ast",
    "tokenize", "codecs", "locale", "gettext", "optparse", "operator", "math", "cmath", "hashlib", "hmac",
    "secrets", "uuid", "base64", "struct", "array", "weakref", "abc", "io", "os", "sys", "time",
)


def module_docstrings(modules, max_chars: int, min_len: int = 200, missing: list | None = None) -> list[str]:
    """Docstrings (at least min_len characters) of `modules` and their public functions and classes; the names of
    modules that cannot be imported here are appended to `missing`."""
    texts: list[str] = []
    total = 0
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:  # an optional stdlib module this Python lacks: said, since the corpus changes
            if missing is not None:
                missing.append(name)
            continue
        docs = [inspect.getdoc(module) or ""]
        for attr in sorted(dir(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr, None)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                docs.append(inspect.getdoc(obj) or "")
        for doc in docs:
            doc = doc.strip()
            if len(doc) >= min_len:
                texts.append(doc)
                total += len(doc)
                if total >= max_chars:
                    return texts
    return texts


def stdlib_prose(max_chars: int = 200_000, missing: list | None = None) -> list[str]:
    """The built-in calibration prose: docstrings of PROSE_MODULES (modules this Python lacks go to `missing`)."""
    return module_docstrings(PROSE_MODULES, max_chars, missing=missing)
