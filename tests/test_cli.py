"""The command line: help, clear errors for bad input, and the inspect/generate round trip."""

import json
import re

import pytest
import torch

from taylormlp.cli import build_parser, main

from conftest import FAST


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _commands():
    return build_parser()._subparsers._group_actions[0].choices


def test_help_explains_every_flag(capsys):
    from taylormlp.cli.parser import TERMS, Number

    sub = _commands()
    assert set(sub) == {"protect", "generate", "inspect", "compare", "bench", "audit", "demo", "serve"}
    for name, parser in sub.items():
        assert parser.description and len(parser.description) > 40, f"{name} has no description"
        assert TERMS in parser.epilog, f"{name}'s help does not define SOURCE and RELEASE"
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings} has no help text"
            if action.nargs != 0 and not action.required:  # a flag that takes a value says what it is without one
                assert "default" in action.help.lower(), f"{name} {action.option_strings} does not name its default"
            if isinstance(action.type, Number):
                assert action.type.limits in action.help, f"{name} {action.option_strings} does not say its limits"
    assert "SOURCE" in TERMS and ".gguf file" in TERMS and "smollm2-135m-instruct" in TERMS


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_audit_help_names_every_attack_with_its_cost(capsys):
    from taylormlp.attacks import ATTACKS
    from taylormlp.attacks.registry import get_attack

    text = " ".join(_help(["audit", "--help"], capsys).split())  # argparse wraps lines
    for name in ATTACKS:
        attack = get_attack(name)
        assert f"{name} {' '.join(attack.description.split())} [{attack.cost}]" in text, name
    assert f"default: all 5: {', '.join(ATTACKS)}" in text


def test_version_prints_the_package_version(capsys):
    import taylormlp

    assert _help(["--version"], capsys).strip() == f"taylormlp {taylormlp.__version__}"


def test_help_and_usage_errors_import_no_torch():
    """`taylormlp --help` answers at once: the parser and everything it imports load neither torch nor transformers
    (the commands are imported after parsing)."""
    import subprocess
    import sys

    code = ("import sys, taylormlp.cli as cli; cli.build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'tqdm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
    done = subprocess.run([sys.executable, "-m", "taylormlp.cli", "protect", "x", "--out", "y", "--order", "0"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--order must be between 1 and" in done.stderr


def test_tables_have_one_definition():
    """The CLI's torch-free tables are the very ones the heavy modules use; runtime.BASES, which runtime.py (copied
    into releases) must define itself, equals choices.BASES."""
    from taylormlp import runtime
    from taylormlp.common import choices
    from taylormlp.protection import options
    from taylormlp.release import directory as release
    from taylormlp.maths import series
    from taylormlp.release import sources
    from taylormlp.attacks import ATTACKS
    from taylormlp.attacks.registry import get_attack

    assert runtime.BASES == choices.BASES
    assert options.PRESETS is choices.PRESETS and options.MAX_PIECES is choices.MAX_PIECES
    assert series.MAX_ORDER == choices.MAX_ORDER and sources.BUILTIN_MODELS is choices.BUILTIN_MODELS
    assert tuple(release.DTYPES) == choices.DTYPE_NAMES
    assert ATTACKS == choices.DEFAULT_ATTACKS
    for name, info in choices.ATTACKS.items():
        attack = get_attack(name)
        assert (attack.rank, attack.description, attack.cost, attack.no_grad) == (info.rank, info.description,
                                                                                  info.cost, info.no_grad)


@pytest.mark.parametrize("field, value, message", [
    ("order", 500, r"order \(--order\) must be a whole number between 1 and 96, got 500"),
    ("order", 2.5, r"order \(--order\) must be a whole number"),
    ("error_budget", float("nan"), r"error_budget \(--error-budget\) must be a positive number, got nan"),
    ("error_budget", -1.0, r"error_budget \(--error-budget\) must be a positive number, got -1\.0"),
    ("coverage", float("inf"), r"coverage \(--coverage\) must be between 0 and 1, got inf"),
    ("max_pieces", 100, r"max_pieces \(--max-pieces\) must be a whole number between 1 and 64, got 100"),
    ("piece_tolerance", 0.0, r"piece_tolerance must be a positive number, got 0\.0"),
    ("margin", float("nan"), r"margin must be between 0 and 1, got nan"),
    ("seed", -1, r"seed \(--seed\) must be a whole number of at least 0"),
])
def test_protect_options_check_the_python_api(field, value, message):
    from taylormlp.common.errors import TaylorMLPError
    from taylormlp.protection.options import ProtectOptions

    with pytest.raises(TaylorMLPError, match=message):
        ProtectOptions(**{field: value}).resolved()
    ProtectOptions(order=8, error_budget=0.5, coverage=1, max_pieces=64, seed=3).resolved()  # the limits are allowed


def test_missing_source_names_the_choices(capsys, tmp_path):
    code, _, err = run_cli(["protect", tmp_path / "nope", "--out", tmp_path / "o"], capsys)
    assert code == 2
    assert "not found" in err and "smollm2-135m-instruct" in err


def test_directory_without_config(capsys, tmp_path):
    (tmp_path / "m").mkdir()
    code, _, err = run_cli(["protect", tmp_path / "m", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "no config.json" in err


def test_unsupported_architecture_lists_supported(capsys, tmp_path, smol_tokenizer):
    from transformers import OPTConfig, OPTForCausalLM

    d = tmp_path / "opt"
    OPTForCausalLM(OPTConfig(vocab_size=len(smol_tokenizer), hidden_size=16, num_hidden_layers=1,
                             num_attention_heads=2, ffn_dim=32, word_embed_proj_dim=16)).save_pretrained(d)
    smol_tokenizer.save_pretrained(d)
    code, _, err = run_cli(["protect", d, "--out", tmp_path / "o"], capsys)
    assert code == 2
    assert "unsupported architecture 'opt'" in err and "llama" in err and "gpt2" in err
    assert not (tmp_path / "o").exists()


def test_nan_weights_are_refused(capsys, tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[0, 0] = float("nan")
    d = tmp_path / "nan"
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(d)
    code, _, err = run_cli(["protect", d, "--out", tmp_path / "o", "--coverage", "0.5"], capsys)
    assert code == 2 and "layer 1" in err and ("NaN" in err or "non-finite" in err)
    assert not (tmp_path / "o").exists()


def test_empty_calibration_file(capsys, tmp_path, tiny_llama_dir):
    empty = tmp_path / "c.txt"
    empty.write_text("   \n\n")
    code, _, err = run_cli(["protect", tiny_llama_dir, "--out", tmp_path / "o", "--calibration", empty], capsys)
    assert code == 2 and "empty" in err and str(empty) in err


def test_existing_output_needs_force(capsys, tiny_release):
    code, _, err = run_cli(["protect", "smollm2-135m-instruct", "--out", tiny_release], capsys)
    assert code == 2 and "already exists" in err and "--force" in err


def test_inspect_json_fields(capsys, tiny_release):
    code, out, _ = run_cli(["inspect", tiny_release, "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    for key in ("format_version", "architecture", "order", "basis", "coverage", "layers", "size_bytes"):
        assert key in info
    assert info["architecture"] == "llama" and info["size_bytes"] > 0
    assert len(info["layers"]) == 2 and all("protected" in row for row in info["layers"])
    assert 0 < info["coverage"] <= 1


def test_inspect_speaks_to_people(capsys, tiny_release):
    """Sizes in MB, what `rest` is, that the manifest check passed, and the validation result."""
    code, out, _ = run_cli(["inspect", tiny_release], capsys)
    info = json.loads(run_cli(["inspect", tiny_release, "--json"], capsys)[1])
    assert code == 0
    assert info["manifest"] == {"verified": True, "files": info["manifest"]["files"]} and info["manifest"]["files"] > 3
    assert f"manifest    passed: {info['manifest']['files']} files, every size and sha256 as recorded" in out
    size = re.search(r"  size +([\d.]+) MB on disk", out)
    assert size and abs(float(size.group(1)) - info["size_bytes"] / 1e6) <= 0.05, out
    assert "unprotected, kept as an ordinary MLP" in out
    val = info["validation"]
    assert f"{val['tokens_matched']}/{val['tokens']} tokens matched the original" in out
    assert f"max logit error {val['max_logit_error']:.3g}" in out
    protected = sum(row["protected"] for row in info["layers"])
    assert f"protected   {protected} of " in out


def test_inspect_leak_check_passes(capsys, tiny_release, tiny_llama_dir):
    code, out, _ = run_cli(["inspect", tiny_release, "--leak-check", tiny_llama_dir], capsys)
    assert code == 0 and "0 leaks" in out and "series coefficients" in out


def test_generate_matches_base(capsys, tiny_release, tiny_llama_dir):
    code, protected, _ = run_cli(["generate", tiny_release, "--prompt", "Hello there", "--chat",
                                  "--max-new-tokens", "8"], capsys)
    assert code == 0
    code, base, _ = run_cli(["generate", tiny_llama_dir, "--base", "--prompt", "Hello there", "--chat",
                             "--max-new-tokens", "8"], capsys)
    assert code == 0 and protected == base and protected.strip()


def test_generate_on_a_non_release(capsys, tmp_path):
    code, _, err = run_cli(["generate", tmp_path, "--prompt", "x"], capsys)
    assert code == 2 and "manifest" in err


def test_resolve_source_is_on_the_top_level_api(tiny_llama_dir):
    """The README's `taylormlp.resolve_source` (a stable place since the stage folders moved release/sources.py)."""
    import taylormlp
    from taylormlp.release import sources

    assert "resolve_source" in taylormlp.__all__ and taylormlp.resolve_source is sources.resolve_source
    assert str(taylormlp.resolve_source(str(tiny_llama_dir))) == str(tiny_llama_dir)

