"""A new user's first hour (issue 18): wrong invocations and existing output paths.

Two tables, each case run in-process through `taylormlp.cli.main`:

* WRONG: an invocation a user can get wrong (a bad flag value, a release given where an original model is expected
  or the reverse, a file where a directory is expected) exits 2 with exactly ONE line on stderr that names the flag
  or path as the user typed it, and leaves nothing behind.
* OUTPUTS: every command that writes (protect --out, demo --out, compare --json, bench --json/--plot, audit --json)
  pointed at an existing file, an existing directory that is no release, or an existing release: nothing there is
  deleted or modified (every file's sha256 and the listing compared before and after) unless --force names it.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from taylormlp.cli import main

from conftest import free_port


@dataclass
class Ctx:
    """A case's private directory (the working directory) holding copies of the tiny model (`src`) and release
    (`rel`), given by relative paths as a user types them, plus a few files."""

    tmp: Path
    src: Path = Path("src")
    rel: Path = Path("rel")

    def file(self, name: str, text: str = "the user's own notes\n") -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path

    def folder(self, name: str = "mine") -> Path:
        """A directory of the user's own that is no release."""
        d = self.tmp / name
        (d / "sub").mkdir(parents=True)
        (d / "notes.txt").write_text("keep me\n")
        (d / "sub" / "data.bin").write_bytes(bytes(range(256)))
        return d

    def empty(self, name: str = "empty") -> Path:
        (self.tmp / name).mkdir()
        return self.tmp / name

    def unmanifested(self) -> Path:
        """A release whose manifest is gone: still recognisably a release (its config.json's taylormlp section)."""
        (self.rel / "taylormlp_manifest.json").unlink()
        return self.rel


@dataclass
class Case:
    id: str
    argv: Callable[[Ctx], list]
    message: str  # regex the single stderr line must match (after "taylormlp COMMAND: error: ")
    prefix: str | None = None  # the line's start when it is not "taylormlp <argv[0]>: " (then "error: ")


def protect(*flags):
    return lambda c: ["protect", c.src, "--out", c.tmp / "out", *flags]


def gen(*flags):
    return lambda c: ["generate", c.rel, "--prompt", "hi", *flags]


RELEASE_AS_SOURCE = r"error: rel is a taylormlp release, not an original model; {} takes the original \(unprotected\) "
SOURCE_AS_RELEASE = r"error: src is an original model directory, not a taylormlp release \(taylormlp_manifest\.json is "

WRONG = [
    # ---- numbers: the flag as typed, its limits, NaN and inf refused
    Case("protect/max-pieces-too-many", protect("--max-pieces", "100"),
         r"--max-pieces must be between 1 and 64, got 100"),
    Case("protect/max-pieces-zero", protect("--max-pieces", "0"), r"--max-pieces must be between 1 and 64, got 0"),
    Case("protect/error-budget-negative", protect("--error-budget", "-1"),
         r"--error-budget must be greater than 0, got -1"),
    Case("protect/error-budget-nan", protect("--error-budget", "nan"),
         r"--error-budget must be a finite number \(greater than 0\), got 'nan'"),
    Case("protect/error-budget-inf", protect("--error-budget", "inf"), r"--error-budget must be a finite number"),
    Case("protect/error-budget-text", protect("--error-budget", "small"),
         r"--error-budget must be a number \(greater than 0\), got 'small'"),
    Case("protect/coverage-nan", protect("--coverage", "nan"),
         r"--coverage must be a finite number \(between 0 and 1\)"),
    Case("protect/coverage-above-one", protect("--coverage", "1.5"), r"--coverage must be between 0 and 1, got 1\.5"),
    Case("protect/slowdown-inf", protect("--slowdown", "inf"), r"--slowdown must be a finite number"),
    Case("protect/slowdown-too-small", protect("--slowdown", "1.1"),
         r"--slowdown must be between 1\.25 and 16, got 1\.1"),
    Case("protect/serving-batch-zero", protect("--slowdown", "4", "--serving-batch", "0"),
         r"--serving-batch must be between 1 and 1024, got 0"),
    Case("protect/serving-batch-without-slowdown", protect("--serving-batch", "8"),
         r"--serving-batch 8 needs --slowdown X: .*add --slowdown or drop --serving-batch"),
    Case("protect/rounds-without-slowdown", protect("--rounds", "5"),
         r"--rounds 5 needs --slowdown X: .*add --slowdown or drop --rounds"),
    Case("protect/rounds-zero", protect("--slowdown", "4", "--rounds", "0"), r"--rounds must be between 1 and 12, got 0"),
    Case("protect/order-zero", protect("--order", "0"), r"--order must be between 1 and 96, got 0"),
    Case("protect/order-too-high", protect("--order", "500"), r"--order must be between 1 and 96, got 500"),
    Case("protect/order-fraction", protect("--order", "2.5"), r"--order must be a whole number \(between 1 and 96\), "
                                                              r"got '2\.5'"),
    Case("protect/seed-negative", protect("--seed", "-1"), r"--seed must be at least 0, got -1"),
    Case("protect/batch-size-zero", protect("--batch-size", "0"), r"--batch-size must be at least 1, got 0"),
    Case("protect/calibration-samples-text", protect("--calibration-samples", "all"),
         r"--calibration-samples must be a whole number \(at least 1\), got 'all'"),
    Case("protect/unknown-preset", protect("--preset", "fast"), r"--preset: invalid choice: 'fast'"),
    Case("protect/unknown-basis", protect("--basis", "fourier"), r"--basis: invalid choice: 'fourier'"),
    Case("protect/unknown-dtype", protect("--dtype", "int8"), r"--dtype: invalid choice: 'int8'"),
    Case("protect/no-out", lambda c: ["protect", c.src], r"the following arguments are required: --out"),
    Case("protect/unknown-flag", protect("--pieces", "4"), r"unrecognized arguments: --pieces 4"),
    Case("protect/calibration-is-a-folder", lambda c: [*protect()(c), "--calibration", c.empty("corpus")],
         r"--calibration .*corpus is a directory; give a UTF-8 text file"),
    Case("protect/calibration-missing", lambda c: [*protect()(c), "--calibration", "corpus.txt"],
         r"--calibration corpus\.txt: calibration file not found"),
    Case("generate/max-new-tokens-text", gen("--max-new-tokens", "abc"),
         r"--max-new-tokens must be a whole number \(at least 1\), got 'abc'"),
    Case("generate/max-new-tokens-zero", gen("--max-new-tokens", "0"), r"--max-new-tokens must be at least 1, got 0"),
    Case("generate/no-prompt", lambda c: ["generate", c.rel], r"the following arguments are required: --prompt"),
    Case("compare/max-new-tokens-negative", lambda c: ["compare", c.src, c.rel, "--prompts", c.file("p.json", "[]"),
                                                       "--max-new-tokens", "-3"],
         r"--max-new-tokens must be at least 1, got -3"),
    Case("bench/tokens-zero", lambda c: ["bench", c.src, c.rel, "--tokens", "0"],
         r"--tokens must be at least 1, got 0"),
    Case("bench/repeats-fraction", lambda c: ["bench", c.src, c.rel, "--repeats", "1.5"],
         r"--repeats must be a whole number \(at least 1\), got '1\.5'"),
    Case("bench/batch-sizes-zero", lambda c: ["bench", c.src, c.rel, "--batch-sizes", "1", "0", "8"],
         r"--batch-sizes must be between 1 and 1024, got 0"),
    Case("bench/batch-sizes-empty", lambda c: ["bench", c.src, c.rel, "--batch-sizes"],
         r"--batch-sizes: expected at least one argument"),
    Case("bench/no-release", lambda c: ["bench", c.src], r"the following arguments are required: RELEASE"),
    Case("bench/serve-concurrency-zero", lambda c: ["bench", c.src, c.rel, "--serve-concurrency", "1", "0"],
         r"--serve-concurrency must be between 1 and 256, got 0"),
    Case("bench/serve-concurrency-too-many", lambda c: ["bench", c.src, c.rel, "--serve-concurrency", "1000"],
         r"--serve-concurrency must be between 1 and 256, got 1000"),
    Case("bench/serve-concurrency-empty", lambda c: ["bench", c.src, c.rel, "--serve-concurrency"],
         r"--serve-concurrency: expected at least one argument"),
    Case("bench/serve-concurrency-fraction", lambda c: ["bench", c.src, c.rel, "--serve-concurrency", "2.5"],
         r"--serve-concurrency must be a whole number \(between 1 and 256\), got '2\.5'"),
    Case("bench/serve-requests-zero", lambda c: ["bench", c.src, c.rel, "--serve-concurrency", "1",
                                                 "--serve-requests", "0"], r"--serve-requests must be at least 1, got 0"),
    Case("bench/serve-tokens-without-concurrency", lambda c: ["bench", c.src, c.rel, "--serve-tokens", "8"],
         r"--serve-tokens 8 needs --serve-concurrency C: .*add --serve-concurrency \(e\.g\. 1 8\) or drop --serve-tokens"),
    Case("bench/serve-tokens-text", lambda c: ["bench", c.src, c.rel, "--serve-concurrency", "1", "--serve-tokens",
                                               "many"], r"--serve-tokens must be a whole number \(at least 1\), got 'many'"),
    Case("demo/max-new-tokens-zero", lambda c: ["demo", "--out", c.tmp / "d", "--max-new-tokens", "0"],
         r"--max-new-tokens must be at least 1, got 0"),
    Case("unknown-command", lambda c: ["protec", c.src], r"COMMAND: invalid choice: 'protec'", prefix="taylormlp: "),
    # ---- a release where an original model SOURCE is expected
    Case("generate/base-given-a-release", lambda c: ["generate", c.rel, "--base", "--prompt", "hi"],
         RELEASE_AS_SOURCE.format("--base") + r".*drop --base to run the release"),
    Case("protect/source-is-a-release", lambda c: ["protect", c.rel, "--out", c.tmp / "out"],
         RELEASE_AS_SOURCE.format("SOURCE")),
    Case("protect/dry-run-source-is-a-release", lambda c: ["protect", c.rel, "--out", c.tmp / "out", "--dry-run"],
         RELEASE_AS_SOURCE.format("SOURCE")),
    Case("protect/dry-run-out-exists", lambda c: ["protect", c.src, "--out", c.folder(), "--dry-run"],
         r"output directory \S*mine already exists"),
    Case("protect/source-is-a-release-without-manifest", lambda c: ["protect", c.unmanifested(), "--out",
                                                                    c.tmp / "out"], RELEASE_AS_SOURCE.format("SOURCE")),
    Case("compare/source-is-a-release", lambda c: ["compare", c.rel, c.rel, "--prompts", c.file("p.json", '["hi"]')],
         RELEASE_AS_SOURCE.format("SOURCE")),
    Case("bench/source-is-a-release", lambda c: ["bench", c.rel, c.rel], RELEASE_AS_SOURCE.format("SOURCE")),
    Case("audit/original-is-a-release", lambda c: ["audit", c.rel, "--original", c.rel],
         RELEASE_AS_SOURCE.format("--original")),
    Case("inspect/leak-check-is-a-release", lambda c: ["inspect", c.rel, "--leak-check", c.rel],
         RELEASE_AS_SOURCE.format("--leak-check")),
    # ---- an original model (or a file) where a RELEASE is expected
    Case("generate/release-is-a-model", lambda c: ["generate", c.src, "--prompt", "hi"],
         SOURCE_AS_RELEASE + r".*\(or pass --base to run an original model SOURCE\)"),
    Case("generate/release-is-a-built-in-name", lambda c: ["generate", "smollm2-135m-instruct", "--prompt", "hi"],
         r"smollm2-135m-instruct is the name of a built-in original model, not a release directory.*pass --base"),
    Case("inspect/release-is-a-model", lambda c: ["inspect", c.src], SOURCE_AS_RELEASE),
    Case("inspect/release-is-a-file", lambda c: ["inspect", c.file("README.md")],
         r"README\.md is a file, not a release directory; give a RELEASE directory written by `taylormlp protect`"),
    Case("inspect/release-is-a-gguf", lambda c: ["inspect", c.file("m.gguf")], r"m\.gguf is a GGUF model file, not a "
                                                                              r"release directory"),
    Case("inspect/release-is-an-empty-folder", lambda c: ["inspect", c.empty()],
         r"empty is not a taylormlp release \(it holds no taylormlp_manifest\.json, config\.json or weights\)"),
    Case("inspect/release-missing", lambda c: ["inspect", c.tmp / "nope"], r"release directory .*nope does not exist"),
    Case("compare/release-is-a-model", lambda c: ["compare", c.src, c.src, "--prompts", c.file("p.json", '["hi"]')],
         SOURCE_AS_RELEASE),
    Case("bench/release-is-a-model", lambda c: ["bench", c.src, c.rel, c.src], SOURCE_AS_RELEASE),
    Case("audit/release-is-a-model", lambda c: ["audit", c.src], SOURCE_AS_RELEASE),
    Case("audit/stream-with-an-attack-that-runs-the-model",
         lambda c: ["audit", c.rel, "--stream", "--attacks", "factorization,distill"],
         r"--stream runs only the closed-form attacks; distill run\(s\) the model .*use --attacks factorization$"),
    Case("serve/release-is-a-model", lambda c: ["serve", c.src], SOURCE_AS_RELEASE),
    Case("serve/release-is-a-built-in-name", lambda c: ["serve", "smollm2-135m-instruct"],
         r"smollm2-135m-instruct is the name of a built-in original model, not a release directory"),
    Case("serve/release-is-a-file", lambda c: ["serve", c.file("model.gguf")], r"model\.gguf is a GGUF model file"),
    Case("serve/release-without-manifest", lambda c: ["serve", c.unmanifested(), "--port", free_port()],
         r"rel is not a complete taylormlp release: taylormlp_manifest\.json is missing"),
    # ---- serve's flags
    Case("serve/port-zero", lambda c: ["serve", c.rel, "--port", "0"], r"--port must be between 1 and 65535, got 0"),
    Case("serve/port-too-high", lambda c: ["serve", c.rel, "--port", "70000"],
         r"--port must be between 1 and 65535, got 70000"),
    Case("serve/port-text", lambda c: ["serve", c.rel, "--port", "http"],
         r"--port must be a whole number \(between 1 and 65535\), got 'http'"),
    Case("serve/host-not-here", lambda c: ["serve", c.rel, "--host", "192.0.2.1", "--port", free_port()],
         r"--host 192\.0\.2\.1: not an address of this machine"),
    Case("serve/kv-cache-tokens-too-few", lambda c: ["serve", c.rel, "--kv-cache-tokens", "100"],
         r"--kv-cache-tokens must be at least 256, got 100"),
    Case("serve/max-batch-tokens-zero", lambda c: ["serve", c.rel, "--max-batch-tokens", "0"],
         r"--max-batch-tokens must be at least 16, got 0"),
    Case("serve/unknown-batching", lambda c: ["serve", c.rel, "--batching", "dynamic"],
         r"--batching: invalid choice: 'dynamic'"),
]


def _state(root: Path) -> dict:
    """Every entry under `root` with each file's sha256: what must be the same after a refused command."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


@pytest.fixture
def ctx(tmp_path, tiny_llama_dir, tiny_release, monkeypatch):
    work = tmp_path / "case"
    work.mkdir()
    shutil.copytree(tiny_llama_dir, work / "src")
    shutil.copytree(tiny_release, work / "rel")
    systmp = tmp_path / "tmpdir"
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))  # probes and temporary directories land where we look
    monkeypatch.setenv("TAYLORMLP_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(work)
    return Ctx(work)


def _run(argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's usage errors
        return exc.code


def _check_one_line(captured, argv, message, prefix=None) -> None:
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err[-2000:]
    start = (prefix or f"taylormlp {argv[0]}: ") + "error: "
    assert lines[0].startswith(start), lines[0]
    assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize("case", WRONG, ids=[c.id for c in WRONG])
def test_wrong_invocation_is_one_line_naming_it(case, ctx, tmp_path, capsys):
    argv = [str(a) for a in case.argv(ctx)]
    before = _state(tmp_path)
    code = _run(argv)
    captured = capsys.readouterr()
    assert code == 2, (code, captured.err[-2000:])
    _check_one_line(captured, argv, case.message, case.prefix)
    assert _state(tmp_path) == before, "the command changed, left or deleted something"


# ---------------------------------------------------------------- existing output paths


@dataclass
class Out:
    id: str
    argv: Callable[[Ctx], list]
    message: str | None  # None: the command succeeds (and must still leave every existing file as it was)


def _corrupt(c: Ctx) -> Path:
    (c.rel / "README.md").write_text("edited by hand\n")  # the manifest's sha256 no longer matches
    return c.rel


def cmp(*flags):
    return lambda c: ["compare", c.src, c.rel, "--prompts", c.file("p.json", '["hi"]'), "--max-new-tokens", "1", *flags]


def bench(*flags):
    return lambda c: ["bench", c.src, c.rel, "--tokens", "1", "--repeats", "1", *flags]


def audit(*flags):
    return lambda c: ["audit", c.rel, "--attacks", "coefficient_ratio", *flags]


EXISTS = r"already exists; choose another {} or pass --force to replace it"
NOT_DIR = r"exists and is not a directory; choose another --out"
FOREIGN = r"holds files that are not a taylormlp release; --force replaces only an earlier release or an empty directo"
IS_DIR = r"{} .* is a directory; give a file name"

OUTPUTS = [
    Out("protect/out-file", lambda c: ["protect", c.src, "--out", c.file("out")], NOT_DIR),
    Out("protect/out-file-force", lambda c: ["protect", c.src, "--out", c.file("out"), "--force"], NOT_DIR),
    Out("protect/out-folder", lambda c: ["protect", c.src, "--out", c.folder()], r"already exists; choose another "
                                                                                 r"--out or pass --force"),
    Out("protect/out-folder-force", lambda c: ["protect", c.src, "--out", c.folder(), "--force"], FOREIGN),
    Out("protect/out-release", lambda c: ["protect", c.src, "--out", c.rel], r"already exists; choose another --out"),
    Out("demo/out-file", lambda c: ["demo", "--out", c.file("out")], NOT_DIR),
    Out("demo/out-file-force", lambda c: ["demo", "--out", c.file("out"), "--force"], NOT_DIR),
    Out("demo/out-folder", lambda c: ["demo", "--out", c.folder()],
        r"--out .*mine exists and is not a usable release .*\(--force replaces only an earlier release"),
    Out("demo/out-folder-force", lambda c: ["demo", "--out", c.folder(), "--force"], FOREIGN),
    Out("demo/out-broken-release", lambda c: ["demo", "--out", _corrupt(c)],
        r"--out .*rel exists and is not a usable release \(release file README\.md .*pass --force to rebuild it"),
    Out("demo/out-release-is-reused", lambda c: ["demo", "--out", c.rel, "--max-new-tokens", "1"], None),
    Out("compare/json-file", cmp("--json", lambda c: c.file("r.json")), EXISTS.format("--json")),
    Out("compare/json-folder", cmp("--json", lambda c: c.folder()), IS_DIR.format("--json")),
    Out("compare/json-release", cmp("--json", lambda c: c.rel), IS_DIR.format("--json")),
    Out("bench/json-file", bench("--json", lambda c: c.file("b.json")), EXISTS.format("--json")),
    Out("bench/plot-file", bench("--plot", lambda c: c.file("b.png")), EXISTS.format("--plot")),
    Out("bench/plot-folder", bench("--plot", lambda c: c.folder()), IS_DIR.format("--plot")),
    Out("bench/json-folder", bench("--json", lambda c: c.folder()), IS_DIR.format("--json")),
    Out("bench/json-release", bench("--json", lambda c: c.rel), IS_DIR.format("--json")),
    Out("bench/plot-release", bench("--plot", lambda c: c.rel), IS_DIR.format("--plot")),
    Out("audit/json-file", audit("--json", lambda c: c.file("a.json")), EXISTS.format("--json")),
    Out("audit/json-folder", audit("--json", lambda c: c.folder()), IS_DIR.format("--json")),
    Out("audit/json-release", audit("--json", lambda c: c.rel), IS_DIR.format("--json")),
    Out("inspect/reads-only", lambda c: ["inspect", c.rel, "--leak-check", c.src], None),
]


def _argv(case: Out, c: Ctx) -> list[str]:
    return [str(a(c) if callable(a) else a) for a in case.argv(c)]


@pytest.mark.parametrize("case", OUTPUTS, ids=[c.id for c in OUTPUTS])
def test_existing_outputs_are_left_alone(case, ctx, tmp_path, capsys, monkeypatch):
    import taylormlp.cli.demo

    monkeypatch.setattr(taylormlp.cli.demo, "DEMO_SOURCE", str(ctx.src))  # the tiny model stands in for SmolLM2
    argv = _argv(case, ctx)
    before = _state(tmp_path)
    code = _run(argv)
    captured = capsys.readouterr()
    if case.message is None:
        assert code == 0, captured.err[-2000:]
    else:
        assert code == 2, (code, captured.err[-2000:])
        _check_one_line(captured, argv, case.message)
    assert _state(tmp_path) == before, "an existing file or directory was modified, deleted or added to"


def test_force_replaces_an_existing_json_file(ctx, capsys):
    target = ctx.file("r.json")
    assert _run(_argv(Out("x", cmp("--json", target, "--force"), None), ctx)) == 0, capsys.readouterr().err
    assert '"identical"' in target.read_text()


def test_force_replaces_an_earlier_release_and_an_empty_directory(ctx, capsys):
    for out in (ctx.rel, ctx.empty()):
        code = _run(["protect", ctx.src, "--out", out, "--force", "--coverage", "0.5", "--calibration-samples", "4"])
        assert code == 0, capsys.readouterr().err
        assert (out / "taylormlp_manifest.json").is_file()
