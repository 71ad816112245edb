"""Every input a user can get wrong is ONE line on stderr naming the input and the fix, exit status 2, no traceback,
and nothing new left where the command writes.  One table: each case builds its bad input, runs the CLI in-process
(`taylormlp.cli.main`) and checks the exit code, the single stderr line against a regex, and that no file or
directory appeared under the case's temporary directory (temporary directories, partial releases, GGUF caches and
JSON files included: TMPDIR and TAYLORMLP_CACHE point inside it) or in any other place it writes to."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from taylormlp.cli import main

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@dataclass
class Ctx:
    """What a case's setup gets: a private directory, the tiny model and release, and pytest's monkeypatch."""

    tmp: Path
    tiny_dir: Path
    tiny_rel: Path
    monkeypatch: pytest.MonkeyPatch
    watched: list = field(default_factory=list)

    def source(self, damage: Callable[[Path], None] | None = None) -> str:
        d = self.tmp / "src"
        shutil.copytree(self.tiny_dir, d)
        if damage:
            damage(d)
        return str(d)

    def release(self, damage: Callable[[Path], None] | None = None) -> str:
        d = self.tmp / "rel"
        shutil.copytree(self.tiny_rel, d)
        if damage:
            damage(d)
        return str(d)

    def file(self, name: str, content) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return str(path)

    def a_file(self) -> Path:
        """A plain file, for output paths that lie under a file."""
        return Path(self.file("afile.txt", "I am a file, not a directory\n"))

    def readonly(self) -> Path:
        """A directory nothing can be created in.  As root, permission bits do not stop writes, so root gets /sys
        (no new entries permitted there, whatever the user)."""
        if os.geteuid() != 0:
            d = self.tmp / "readonly"
            d.mkdir()
            d.chmod(0o555)
            return d
        try:
            os.rmdir(tempfile.mkdtemp(dir="/sys"))
        except OSError:
            self.watched.append(Path("/sys"))
            return Path("/sys")
        pytest.skip("no read-only directory available on this machine")

    def prompts(self, data) -> str:
        return self.file("prompts.json", data if isinstance(data, (str, bytes)) else json.dumps(data))


# ---------------------------------------------------------------- damage to a model directory or a release


def _write(name: str, content):
    def damage(d: Path):
        (d / name).write_bytes(content) if isinstance(content, bytes) else (d / name).write_text(content)
    return damage


def _truncate(name: str, keep: float = 0.5):
    def damage(d: Path):
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[:int(len(data) * keep)])
    return damage


def _copy_over(src_name: str, dst_name: str):
    def damage(d: Path):
        shutil.copyfile(d / src_name, d / dst_name)
    return damage


def _no_bos(d: Path):
    """A model whose tokenizer and config name no BOS token."""
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["bos_token"] = None
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    for name in ("config.json", "generation_config.json"):
        data = json.loads((d / name).read_text())
        data["bos_token_id"] = None
        (d / name).write_text(json.dumps(data))


def _manifest(update):
    def damage(d: Path):
        path = d / "taylormlp_manifest.json"
        path.write_text(json.dumps(update(json.loads(path.read_text()))))
    return damage


def _future_config_version(d: Path):
    """A consistent release (manifest matches) whose config says taylormlp format version 99."""
    from taylormlp.release.directory import write_manifest

    cfg = json.loads((d / "config.json").read_text())
    cfg["taylormlp"]["format_version"] = 99
    (d / "config.json").write_text(json.dumps(cfg))
    write_manifest(d)


def _drop_tokenizer(d: Path):
    """A release written without its tokenizer (save_release(model, DIR) through the API), manifest consistent."""
    from taylormlp.release.directory import write_manifest

    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (d / name).exists():
            (d / name).unlink()
    write_manifest(d)


def _shard(d: Path) -> str:
    return sorted(p.name for p in d.glob("model-*.safetensors"))[-1]


def _truncate_shard(d: Path):
    _truncate(_shard(d), 0.9)(d)


def _gguf_head(n: int) -> bytes:
    from taylormlp.release.sources import BUILTIN_MODELS

    with open(BUILTIN_MODELS["smollm2-135m-instruct"].gguf_path(), "rb") as fh:
        return fh.read(n)


def _fail_on_manifest_write(c: Ctx):
    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == "taylormlp_manifest.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *args, **kwargs)
    c.monkeypatch.setattr(Path, "write_text", write_text)


def _fail_on_save_file(c: Ctx):
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = []

    def save_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:  # the first shard is written, the disk fills up on the second
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real(tensors, filename, *args, **kwargs)
    c.monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def _fail_on_json_write(c: Ctx):
    """The JSON file is created, then the disk fills up half way through writing it."""
    import taylormlp.common.paths

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, text):
            self.fh.write(text[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    c.monkeypatch.setattr(taylormlp.common.paths, "open", lambda *a, **k: Full(open(*a, **k)), raising=False)


PROTECT_FAST = ["--coverage", "0.5", "--calibration-samples", "10"]
SHAPE = r"give \{\"prompts\""


@dataclass
class Case:
    id: str
    setup: Callable[[Ctx], list]  # builds the bad input, returns argv
    message: str  # regex that must appear in the single stderr line


CASES = [
    # ---- protect: source files corrupt, truncated or mislabelled
    Case("protect/config-truncated", lambda c: ["protect", c.source(_write("config.json", '{"model_type": "lla')),
                                                 "--out", c.tmp / "out"], r"config\.json.*re-download or re-save"),
    Case("protect/config-binary", lambda c: ["protect", c.source(_write("config.json", b"\xff\xfe\x00\x01" * 9)),
                                              "--out", c.tmp / "out"], r"config\.json.*re-download or re-save"),
    Case("protect/config-mislabelled", lambda c: ["protect", c.source(_copy_over("generation_config.json",
                                                                                 "config.json")),
                                                   "--out", c.tmp / "out"], r"config\.json.*model_type"),
    Case("protect/tokenizer-json-truncated", lambda c: ["protect", c.source(_truncate("tokenizer.json")),
                                                        "--out", c.tmp / "out"],
         r"tokenizer\.json is not valid JSON.*re-download"),
    Case("protect/tokenizer-json-binary", lambda c: ["protect", c.source(_write("tokenizer.json", b"\x80\x81" * 50)),
                                                     "--out", c.tmp / "out"], r"tokenizer\.json is not UTF-8 text"),
    Case("protect/tokenizer-json-mislabelled", lambda c: ["protect", c.source(_copy_over("config.json",
                                                                                        "tokenizer.json")),
                                                          "--out", c.tmp / "out"],
         r"could not load the tokenizer from .*tokenizer\.json.*re-download"),
    Case("protect/tokenizer-config-corrupt", lambda c: ["protect", c.source(_write("tokenizer_config.json", "[1, 2")),
                                                        "--out", c.tmp / "out"], r"tokenizer_config\.json is not valid"),
    Case("protect/tokenizer-config-a-list", lambda c: ["protect", c.source(_write("tokenizer_config.json", "[1, 2]")),
                                                       "--out", c.tmp / "out"],
         r"tokenizer_config\.json holds a JSON list, not a JSON dict"),
    Case("protect/safetensors-truncated", lambda c: ["protect", c.source(_truncate("model.safetensors", 0.7)),
                                                     "--out", c.tmp / "out"], r"model\.safetensors: .*re-download"),
    Case("protect/safetensors-mislabelled", lambda c: ["protect", c.source(_write("model.safetensors",
                                                                                  b"GGUF\x03\x00\x00\x00" * 64)),
                                                       "--out", c.tmp / "out"],
         r"model\.safetensors: not a safetensors file"),
    Case("protect/gguf-garbage", lambda c: ["protect", c.file("m.gguf", b"GGUF" + bytes(10)), "--out", c.tmp / "out"],
         r"m\.gguf: not a readable GGUF file.*re-download"),
    Case("protect/gguf-truncated", lambda c: ["protect", c.file("m.gguf", _gguf_head(1024)), "--out", c.tmp / "out"],
         r"m\.gguf: not a readable GGUF file.*truncated"),
    Case("protect/gguf-mislabelled", lambda c: ["protect", c.file("m.gguf", (c.tiny_dir / "model.safetensors")
                                                                  .read_bytes()), "--out", c.tmp / "out"],
         r"m\.gguf: not a readable GGUF file \(GGUF magic invalid\)"),
    Case("protect/calibration-binary", lambda c: ["protect", c.tiny_dir, "--out", c.tmp / "out", "--calibration",
                                                  c.file("cal.txt", b"\xff\xfe" * 40)], r"cal\.txt is not UTF-8"),
    # ---- protect: output paths that cannot be created or filled
    Case("protect/out-under-a-file", lambda c: ["protect", c.tiny_dir, "--out", c.a_file() / "rel"],
         r"--out .*afile\.txt is a file, not a directory.*choose another --out"),
    Case("protect/out-is-a-file", lambda c: ["protect", c.tiny_dir, "--out", c.a_file(), "--force"],
         r"afile\.txt exists and is not a directory; choose another --out"),
    Case("protect/out-exists", lambda c: ["protect", c.tiny_dir, "--out", c.release()],
         r"already exists; choose another --out or pass --force"),
    Case("protect/out-read-only", lambda c: ["protect", c.tiny_dir, "--out", c.readonly() / "taylormlp-rel"],
         r"--out .*: cannot create anything in .*choose a writable --out"),
    Case("protect/disk-full-on-a-shard", lambda c: (_fail_on_save_file(c), ["protect", c.tiny_dir, "--out",
                                                                             c.tmp / "out", *PROTECT_FAST])[1],
         r"writing the release to .*out failed \(No space left on device; disk full"),
    Case("protect/disk-full-on-the-manifest", lambda c: (_fail_on_manifest_write(c), [
        "protect", c.tiny_dir, "--out", c.tmp / "out", *PROTECT_FAST])[1],
         r"writing the release to .*out failed \(No space left on device"),
    # ---- generate: prompts empty, huge or not text; releases broken or of another format version
    Case("generate/empty-prompt-no-bos", lambda c: ["generate", c.source(_no_bos), "--base", "--prompt", ""],
         r"the prompt is empty and this model has no BOS token.*give a prompt"),
    Case("generate/prompt-longer-than-context", lambda c: ["generate", c.tiny_rel, "--prompt", "hello " * 2100],
         r"the prompt is \d+ tokens, longer than the model's context of 2048 tokens.*shorten the prompt"),
    Case("generate/prompt-plus-new-tokens-past-context", lambda c: ["generate", c.tiny_rel, "--prompt",
                                                                     "hello " * 2000, "--max-new-tokens", "100"],
         r"runs past the model's context of 2048 tokens.*--max-new-tokens \d+ or less"),
    Case("generate/prompt-not-utf8", lambda c: ["generate", c.tiny_rel, "--prompt", "caf\udce9"],
         r"the prompt is not text: .*not UTF-8"),
    Case("generate/prompt-with-nul", lambda c: ["generate", c.tiny_rel, "--prompt", "a\x00b"],
         r"the prompt is not text: it holds a NUL"),
    Case("generate/release-format-version", lambda c: ["generate", c.release(_manifest(
        lambda m: {**m, "format_version": 3})), "--prompt", "hi"],
         r"unknown format_version 3; this taylormlp reads versions 1 and 2 \(upgrade taylormlp\?\)"),
    Case("generate/release-config-format-version", lambda c: ["generate", c.release(_future_config_version),
                                                               "--prompt", "hi"],
         r"config\.json: unknown taylormlp format_version 99"),
    Case("generate/release-without-tokenizer", lambda c: ["generate", c.release(_drop_tokenizer), "--prompt", "hi"],
         r"release .* carries no usable tokenizer"),
    Case("generate/chat-without-template", lambda c: ["generate", c.source(lambda d: (d / "chat_template.jinja")
                                                                         .unlink()), "--base", "--chat", "--prompt",
                                                      "hi"], r"has no chat template; drop --chat"),
    Case("generate/release-truncated-shard", lambda c: ["generate", c.release(_truncate_shard), "--prompt", "hi"],
         r"release file model-\d+-of-\d+\.safetensors has \d+ bytes, the manifest says"),
    Case("generate/base-safetensors-corrupt", lambda c: ["generate", c.source(_write("model.safetensors", b"x" * 80)),
                                                         "--base", "--prompt", "hi"],
         r"model\.safetensors: not a safetensors file"),
    Case("generate/base-tokenizer-corrupt", lambda c: ["generate", c.source(_truncate("tokenizer.json", 0.3)),
                                                       "--base", "--prompt", "hi"], r"tokenizer\.json is not valid JSON"),
    # ---- inspect
    Case("inspect/manifest-binary", lambda c: ["inspect", c.release(_write("taylormlp_manifest.json", b"\xff" * 9))],
         r"taylormlp_manifest\.json is (corrupt|not valid JSON|not UTF-8 text).*re-download the release or run `taylormlp protect` again"),
    Case("inspect/manifest-wrong-shape", lambda c: ["inspect", c.release(_manifest(
        lambda m: {**m, "files": {"config.json": {"bytes": 3}}}))],
         r"taylormlp_manifest\.json is corrupt \(every file needs a size and a sha256\)"),
    Case("inspect/manifest-escapes-release", lambda c: ["inspect", c.release(_manifest(
        lambda m: {**m, "files": {"../afile.txt": {"size": 1, "sha256": "0"}}}))], r"outside the release"),
    Case("inspect/not-a-release", lambda c: ["inspect", c.source()], r"taylormlp_manifest\.json is missing"),
    Case("inspect/release-format-version", lambda c: ["inspect", c.release(_manifest(
        lambda m: {**m, "format_version": 7}))], r"unknown format_version 7"),
    Case("inspect/leak-check-source-corrupt", lambda c: ["inspect", c.tiny_rel, "--leak-check",
                                                         c.source(_write("config.json", "{,"))],
         r"config\.json is not valid JSON"),
    # ---- compare: prompt files of the wrong shape, outputs that cannot be written
    Case("compare/prompts-not-json", lambda c: ["compare", c.tiny_dir, c.tiny_rel, "--prompts", c.prompts("{nope")],
         r"prompts\.json is not valid JSON"),
    Case("compare/prompts-binary", lambda c: ["compare", c.tiny_dir, c.tiny_rel, "--prompts",
                                              c.prompts(b"\x89PNG\r\n\x1a\n" + bytes(40))],
         r"prompts\.json is not UTF-8 text"),
    Case("compare/prompts-a-number", lambda c: ["compare", c.tiny_dir, c.tiny_rel, "--prompts", c.prompts("42")],
         r"prompts\.json: the prompts are a JSON int, not a list; " + SHAPE),
    Case("compare/prompts-list-of-numbers", lambda c: ["compare", c.tiny_dir, c.tiny_rel, "--prompts",
                                                       c.prompts([1, 2, 3])],
         r"prompt 0 is a JSON int \(1\), not an object or a string"),
    Case("compare/prompts-missing-text", lambda c: ["compare", c.tiny_dir, c.tiny_rel, "--prompts",
                                                    c.prompts({"prompts": [{"kind": "raw", "prompt": "hi"}]})],
         r"prompt 0 needs kind 'chat' or 'raw' and a non-empty text string"),
    Case("compare/prompts-empty-text", lambda c: ["compare", c.tiny_dir, c.tiny_rel, "--prompts",
                                                  c.prompts({"prompts": [{"kind": "chat", "text": ""}]})],
         r"prompt 0 needs kind .* non-empty text string"),
    Case("compare/prompts-text-not-a-string", lambda c: ["compare", c.tiny_dir, c.tiny_rel, "--prompts",
                                                         c.prompts([{"kind": "raw", "text": 7}])],
         r"prompt 0 needs kind .* non-empty text string"),
    Case("compare/prompts-no-prompts-key", lambda c: ["compare", c.tiny_dir, c.tiny_rel, "--prompts",
                                                      c.prompts({"items": []})],
         r"has no 'prompts' list \(keys: items\)"),
    Case("compare/prompts-empty", lambda c: ["compare", c.tiny_dir, c.tiny_rel, "--prompts", c.prompts([])],
         r"holds no prompts"),
    Case("compare/prompts-missing-file", lambda c: ["compare", c.tiny_dir, c.tiny_rel, "--prompts",
                                                    c.tmp / "nope.json"], r"nope\.json not found"),
    Case("compare/prompt-longer-than-context", lambda c: ["compare", c.tiny_dir, c.tiny_rel, "--prompts",
                                                          c.prompts(["hello " * 2100])],
         r"prompt 0 .*longer than the model's context of 2048 tokens"),
    Case("compare/json-in-read-only-dir", lambda c: ["compare", c.tiny_dir, c.tiny_rel, "--prompts",
                                                     c.prompts(["hi"]), "--json", c.readonly() / "cmp.json"],
         r"--json .*cannot create anything in"),
    Case("compare/json-under-a-file", lambda c: ["compare", c.tiny_dir, c.tiny_rel, "--prompts",
                                                 c.prompts(["hi"]), "--json", c.a_file() / "cmp.json"],
         r"--json .*afile\.txt is a file, not a directory"),
    Case("compare/json-is-a-directory", lambda c: ["compare", c.tiny_dir, c.tiny_rel, "--prompts",
                                                   c.prompts(["hi"]), "--json", c.tmp],
         r"--json .* is a directory; give a file name"),
    Case("compare/json-disk-full", lambda c: (_fail_on_json_write(c), [
        "compare", c.tiny_dir, c.tiny_rel, "--prompts", c.prompts(["hi"]), "--max-new-tokens", "2",
        "--json", c.tmp / "new" / "cmp.json"])[1],
         r"cannot write --json .*cmp\.json \(No space left on device; disk full"),
    Case("compare/source-tokenizer-mislabelled", lambda c: ["compare", c.source(_copy_over("config.json",
                                                                                         "tokenizer.json")),
                                                            c.tiny_rel, "--prompts", c.prompts(["hi"])],
         r"could not load the tokenizer"),
    # ---- bench
    Case("bench/plot-under-a-file", lambda c: ["bench", c.tiny_dir, c.tiny_rel, "--plot", c.a_file() / "b.png"],
         r"--plot .*afile\.txt is a file"),
    Case("bench/plot-unknown-format", lambda c: ["bench", c.tiny_dir, c.tiny_rel, "--plot", c.tmp / "b.xyz"],
         r"--plot .*b\.xyz: matplotlib cannot write '\.xyz' files; use one of .*\.png"),
    Case("bench/json-in-read-only-dir", lambda c: ["bench", c.tiny_dir, c.tiny_rel, "--json",
                                                   c.readonly() / "b.json"], r"--json .*cannot create anything in"),
    Case("bench/release-format-version", lambda c: ["bench", c.tiny_dir, c.release(_manifest(
        lambda m: {**m, "format_version": 3})), "--tokens", "1", "--repeats", "1"], r"unknown format_version 3"),
    Case("bench/source-config-corrupt", lambda c: ["bench", c.source(_truncate("config.json")), c.tiny_rel],
         r"config\.json is not valid JSON"),
    # ---- audit
    Case("audit/json-under-a-file", lambda c: ["audit", c.tiny_rel, "--json", c.a_file() / "a.json"],
         r"--json .*afile\.txt is a file"),
    Case("audit/json-in-read-only-dir", lambda c: ["audit", c.tiny_rel, "--json", c.readonly() / "a.json"],
         r"--json .*cannot create anything in"),
    Case("audit/release-incomplete", lambda c: ["audit", c.release(lambda d: (d / "taylormlp_manifest.json")
                                                                   .unlink()), "--attacks", "coefficient_ratio"],
         r"not a complete taylormlp release: taylormlp_manifest\.json is missing"),
    Case("audit/original-corrupt", lambda c: ["audit", c.tiny_rel, "--attacks", "coefficient_ratio", "--original",
                                              c.source(_truncate("model.safetensors", 0.5))],
         r"model\.safetensors: .*re-download"),
    Case("audit/unknown-attack", lambda c: ["audit", c.tiny_rel, "--attacks", "telepathy"],
         r"unknown attack\(s\) telepathy; choose from"),
    # ---- demo (fails before any model is loaded)
    Case("demo/out-under-a-file", lambda c: ["demo", "--out", c.a_file() / "demo"],
         r"--out .*afile\.txt is a file, not a directory"),
    Case("demo/out-is-a-file", lambda c: ["demo", "--out", c.a_file()],
         r"exists and is not a directory; choose another --out"),
    Case("demo/out-read-only", lambda c: ["demo", "--out", c.readonly() / "taylormlp-demo"],
         r"--out .*cannot create anything in"),
]


def _snapshot(root: Path) -> set[str]:
    if not root.is_dir():
        return set()
    if root == Path("/sys"):
        return {p.name for p in root.iterdir()}
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_line(case, tmp_path, tiny_llama_dir, tiny_release, monkeypatch, capsys):
    work = tmp_path / "case"
    work.mkdir()
    systmp = tmp_path / "tmpdir"
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))  # offload and probe directories land where we look
    monkeypatch.setenv("TAYLORMLP_CACHE", str(tmp_path / "cache"))  # and so do GGUF conversions
    ctx = Ctx(work, Path(tiny_llama_dir), Path(tiny_release), monkeypatch)
    argv = [str(a) for a in case.setup(ctx)]
    before = {root: _snapshot(root) for root in [tmp_path, *ctx.watched]}
    torch.manual_seed(0)
    code = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, (code, captured.err[-2000:])
    assert "Traceback" not in captured.err
    assert len(lines) == 1, captured.err[-2000:]
    command = argv[0]
    assert lines[0].startswith(f"taylormlp {command}: error: "), lines[0]
    assert re.search(case.message, lines[0]), lines[0]
    for root, seen in before.items():
        left = _snapshot(root) - seen
        assert not left, f"{case.id} left {sorted(left)} in {root}"


# ---------------------------------------------------------------- generation edge cases that are not errors


def test_empty_prompt_generates_from_bos(tiny_release, capsys):
    """An empty prompt with a model that has a BOS token: the continuation of BOS alone, not a crash."""
    from transformers import AutoTokenizer

    from taylormlp.measure.generate import generate_ids
    from taylormlp.release.sources import load_any
    from taylormlp.release.directory import load_release

    code = main(["generate", str(tiny_release), "--prompt", "", "--max-new-tokens", "5"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    model, tokenizer = load_any(tiny_release)
    new, prompt_len = generate_ids(model, tokenizer, "", False, 5)
    assert prompt_len == 1 and len(new) == 5
    bos = AutoTokenizer.from_pretrained(tiny_release).bos_token_id
    ids = torch.tensor([[bos]])
    expected = load_release(tiny_release).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                                   do_sample=False, pad_token_id=tokenizer.eos_token_id)[0, 1:]
    assert torch.equal(new, expected)
    assert captured.out.strip() == tokenizer.decode(new, skip_special_tokens=True).strip()


def test_prompt_that_fits_the_context_exactly_is_accepted(tiny_release):
    from taylormlp.measure.generate import generate_ids
    from taylormlp.release.sources import load_any

    model, tokenizer = load_any(tiny_release)
    model.config.max_position_embeddings = 12
    ids = tokenizer("one two three four five", add_special_tokens=False).input_ids
    new, n = generate_ids(model, tokenizer, "one two three four five", False, 12 - len(ids))
    assert n == len(ids) and len(new) == 12 - len(ids)


def test_write_atomically_full_disk_leaves_no_temporary(tmp_path):
    """release.write_atomically turns ENOSPC into a clear error and removes its temporary directory."""
    from taylormlp.common.errors import TaylorMLPError
    from taylormlp.release.directory import write_atomically

    def fill(tmp: Path):
        (tmp / "a.bin").write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "b.bin"))

    with pytest.raises(TaylorMLPError, match="No space left on device; disk full"):
        write_atomically(tmp_path / "out", False, fill)
    assert list(tmp_path.iterdir()) == []


def test_json_output_creates_missing_directories(tmp_path):
    """A --json path in a directory that does not exist yet is created (as --out is); the file appears whole."""
    from taylormlp.common.paths import dump_json

    target = tmp_path / "a" / "b" / "r.json"
    dump_json({"x": 1}, target)
    assert json.loads(target.read_text()) == {"x": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["r.json"]


@pytest.mark.parametrize("exc, message", [
    (PermissionError(errno.EACCES, "Permission denied", "/some/where/file.bin"), r"cannot use /some/where/file\.bin: "
                                                                                  r"Permission denied; check"),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
     r"an input file is not UTF-8 text \(invalid start byte at byte 0\)"),
    (json.JSONDecodeError("Expecting value", "x", 0), r"an input file is not valid JSON"),
])
def test_safety_net_turns_escaped_io_errors_into_one_line(exc, message, monkeypatch, capsys, tmp_path):
    """OSError / UnicodeDecodeError / JSON errors that escape every specific check still become one line, exit 2."""
    import taylormlp.cli.commands

    def boom(args):
        raise exc
    monkeypatch.setattr(taylormlp.cli.commands, "cmd_inspect", boom)
    code = main(["inspect", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("taylormlp inspect: error: ") and re.search(message, err), err
