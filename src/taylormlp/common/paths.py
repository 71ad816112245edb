"""Output paths the user gives (``--out``, ``--json``, ``--plot``): checked before any work, written atomically.

A path that cannot be created or filled, or an existing file the user did not allow to be replaced (``--force``), is
a TaylorMLPError naming it and the fix, raised before minutes of calibration or benchmarking rather than after, and
a write that fails half way (a full disk) leaves nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import TaylorMLPError
from .progress import log


def nearest_existing(path: Path) -> Path:
    """`path` itself or its closest ancestor that exists (for a relative path, at most the working directory)."""
    current = path
    while not os.path.lexists(current):
        parent = current.parent
        if parent == current:
            break
        current = parent
    return current


def free_space(path) -> int:
    """Bytes free for an unprivileged writer on the file system that `path` (or, where it does not exist yet, its
    nearest existing ancestor) lies on."""
    return shutil.disk_usage(nearest_existing(Path(path).absolute())).free


def check_creatable(path, flag: str) -> None:
    """`path` does not exist yet and must be creatable (with any missing parent directories): its nearest existing
    ancestor must be a directory in which an entry can actually be made (probed, so that read-only file systems and
    permission rules are seen as they are)."""
    path = Path(path)
    anchor = nearest_existing(path.parent if str(path.parent) else Path("."))
    if not anchor.is_dir():
        raise TaylorMLPError(f"{flag} {path}: {anchor} is a file, not a directory; choose another {flag}")
    try:
        probe = tempfile.mkdtemp(prefix=".taylormlp-write-probe-", dir=anchor)
        os.rmdir(probe)
    except OSError as exc:
        raise TaylorMLPError(f"{flag} {path}: cannot create anything in {anchor} ({exc.strerror or exc}: read-only or "
                             f"not permitted); choose a writable {flag}") from exc


def check_output_file(path, flag: str, force: bool) -> None:
    """An output file such as ``--json report.json``: not a directory, not an existing file unless `force` (the
    CLI's --force: nothing is overwritten that the user did not name), and creatable (or replaceable) in place."""
    path = Path(path)
    if path.is_dir():
        raise TaylorMLPError(f"{flag} {path} is a directory; give a file name, e.g. {path / 'out.json'}")
    if str(path).endswith(("/", os.sep)):
        raise TaylorMLPError(f"{flag} {path} names a directory; give a file name")
    if os.path.lexists(path) and not force:
        raise TaylorMLPError(f"{flag} {path} already exists; choose another {flag} or pass --force to replace it")
    check_creatable(path, flag)


def write_text_atomically(path, text: str, flag: str = "output file") -> Path:
    """Write `text` to `path` through a temporary file beside it, renamed into place only when complete: a failure
    (a full disk, a read-only directory) is a TaylorMLPError and leaves `path` as it was, no temporary file and no
    directory this call created."""
    def write(tmp: Path) -> None:
        with open(tmp, "x", encoding="utf-8") as fh:  # "x": the umask's permissions, never an existing file
            fh.write(text)
    return write_atomically(path, write, flag)


def write_atomically(path, write, flag: str = "output file") -> Path:
    """`write(tmp)` fills a temporary file beside `path` (same directory, same suffix: a writer that picks its
    format by the suffix, such as matplotlib's savefig, still does), which is then renamed onto `path`.  A failure
    is a TaylorMLPError and leaves `path` as it was, no temporary file and no directory this call created."""
    path = Path(path)
    missing = []  # parent directories this call creates, removed again on failure
    parent = path.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")

    def clean_up() -> None:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        for directory in missing:  # innermost first
            try:
                directory.rmdir()
            except OSError:
                break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        clean_up()
        raise TaylorMLPError(f"cannot write {flag} {path} ({exc.strerror or exc}; disk full or not writable?); "
                             f"nothing was written there") from exc
    except BaseException:  # the writer's own error, an interrupt: nothing half written stays behind either
        clean_up()
        raise
    return path


def dump_json(obj, path: Path, flag: str = "--json") -> None:
    """Write `obj` as JSON to `path` atomically; a path that cannot be written is a TaylorMLPError naming it."""
    write_text_atomically(Path(path), json.dumps(obj, indent=1), flag)
    log(f"wrote {path}")
