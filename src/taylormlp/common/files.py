"""Reading the small text and JSON files users hand us (configs, manifests, prompt and calibration files): one place
that turns a missing, unreadable, non-UTF-8 or malformed file into a TaylorMLPError naming it and the fix."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import TaylorMLPError


def read_text(path, fix: str, subject: str | None = None) -> str:
    """The UTF-8 text of `path`; `subject` names it in errors (default: the path), `fix` says what to do."""
    subject = subject or str(path)
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TaylorMLPError(f"{subject} is not UTF-8 text (binary or damaged: {exc.reason} at byte {exc.start}); "
                             f"{fix}") from exc
    except OSError as exc:
        raise TaylorMLPError(f"{subject}: cannot read ({exc.strerror or exc}); {fix}") from exc


def read_json(path, fix: str, subject: str | None = None, kind: type | None = dict):
    """The JSON value in `path`, which must be a `kind` (default: an object; None: any)."""
    subject = subject or str(path)
    try:
        data = json.loads(read_text(path, fix, subject))
    except json.JSONDecodeError as exc:
        raise TaylorMLPError(f"{subject} is not valid JSON ({exc}; truncated or damaged?); {fix}") from exc
    if kind is not None and not isinstance(data, kind):
        raise TaylorMLPError(f"{subject} holds a JSON {type(data).__name__}, not a JSON {kind.__name__} "
                             f"(mislabelled?); {fix}")
    return data
