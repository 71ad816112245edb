"""What a path on the command line is: a taylormlp release, an original model, or plainly neither.

Recognised from markers alone, no weights read (torch-free): a release is a directory holding
``taylormlp_manifest.json`` or a config.json with a "taylormlp" section; an original model SOURCE is a Hugging Face
model directory, a ``.gguf`` file or a built-in name.  A release given where an original model is expected, or
the reverse, is one line naming the path before any work (commands.py checks every argument up front;
sources.resolve_source and release.verify_release check again for the Python API).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..common.choices import BUILTIN_MODELS
from ..common.errors import TaylorMLPError

MANIFEST = "taylormlp_manifest.json"
SOURCE_KINDS = "a Hugging Face model directory, a .gguf file or a built-in name (" + ", ".join(BUILTIN_MODELS) + ")"


def is_release(path) -> bool:
    """`path` is a directory with a release's markers (complete or not, valid or not)."""
    d = Path(path)
    if not d.is_dir():
        return False
    if (d / MANIFEST).is_file():
        return True
    try:
        config = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no config.json, or not JSON text (UnicodeDecodeError is a ValueError)
        return False
    return isinstance(config, dict) and "taylormlp" in config


def temporary_prefix(name: str) -> str:
    """The name prefix of the hidden directory a release called `name` is written into before its rename."""
    return f".{name}.tmp-"


def is_temporary_release(path) -> bool:
    """`path` is named like a release still being written (or one left behind by a killed run)."""
    name = Path(path).name
    return name.startswith(".") and ".tmp-" in name


def refuse_release(source, where: str = "SOURCE", hint: str = "") -> None:
    """A TaylorMLPError if `source` is a release: `where` (a flag or argument name) takes an original model."""
    if is_release(source):
        raise TaylorMLPError(f"{source} is a taylormlp release, not an original model; {where} takes the original "
                             f"(unprotected) model: {SOURCE_KINDS}{hint}")


def not_a_release(path) -> str | None:
    """Why `path` is no release directory, in the user's words; None when it has a release's markers, or weights
    without a config.json (an unfinished release): whether it is complete and intact is verify_release's question."""
    text = str(path)
    d = Path(text)
    if not d.exists():
        if text in BUILTIN_MODELS:
            return f"{text} is the name of a built-in original model, not a release directory"
        return f"release directory {d} does not exist"
    if not d.is_dir():
        kind = "a GGUF model file" if d.suffix.lower() == ".gguf" else "a file"
        return f"{d} is {kind}, not a release directory"
    if is_release(d) or is_temporary_release(d):  # a temporary one: verify_release says it is incomplete
        return None
    if (d / "config.json").is_file():
        return (f"{d} is an original model directory, not a taylormlp release ({MANIFEST} is missing and its "
                f"config.json has no \"taylormlp\" section)")
    if not any(d.glob("*.safetensors")):  # a folder of something else (one with shards: an unfinished release)
        return f"{d} is not a taylormlp release (it holds no {MANIFEST}, config.json or weights)"
    return None


def refuse_non_release(path, hint: str = "") -> None:
    """A TaylorMLPError if `path` is not a release (a file, a model directory, a missing path, another folder)."""
    problem = not_a_release(path)
    if problem is not None:
        raise TaylorMLPError(f"{problem}; give a RELEASE directory written by `taylormlp protect`{hint}")
