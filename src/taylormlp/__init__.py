"""taylormlp: release language models as TaylorMLP series parameters instead of plain weights.

Public API (in the spirit of optimum-quanto's quantize/freeze):

    protect(model, tokenizer, calibration=None, preset="default", order=None, coverage=None) -> spec
    save_release(model, directory, tokenizer)
    load_release(directory) -> transformers causal LM whose layers' .mlp are TaylorMLP modules
    resolve_source(source) -> the model directory a SOURCE names (a directory, a .gguf file, a built-in name)
"""

import importlib

from .common import __version__  # noqa: F401 - taylormlp.__version__
from .common.errors import TaylorMLPError

# The one place where taylormlp imports its own modules lazily: the API names below load torch and transformers on
# first use (PEP 562), so that `import taylormlp.cli` -- and with it `taylormlp --help` and every usage error -- needs
# neither (cli/parser.py imports only the torch-free common/choices.py and common/errors.py before parsing).
_LAZY = {"protect": "protection.flow", "ProtectOptions": "protection.options", "save_release": "release.directory",
         "load_release": "release.directory", "TaylorMLP": "runtime", "resolve_source": "release.sources"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = ["protect", "ProtectOptions", "save_release", "load_release", "resolve_source", "TaylorMLP",
           "TaylorMLPError"]
