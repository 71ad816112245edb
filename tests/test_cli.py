"""The command line: help, clear errors for bad input, and the inspect/generate round trip."""

import json

import pytest
import torch

from taylormlp.cli import build_parser, main

from conftest import FAST


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_explains_every_flag(capsys):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    for name in ("protect", "generate", "inspect", "compare", "bench", "audit", "demo"):
        assert name in sub
        for action in sub[name]._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help text"


def test_out_of_range_options_are_rejected(capsys, tmp_path):
    for bad in (["--coverage", "1.5"], ["--order", "0"], ["--slowdown", "0.5"]):
        with pytest.raises(SystemExit) as exc:
            main(["protect", "x", "--out", str(tmp_path / "o"), *bad])
        assert exc.value.code == 2
        assert bad[0] in capsys.readouterr().err


def test_order_above_maximum_is_a_clear_error(capsys, tmp_path, tiny_llama_dir):
    code, _, err = run_cli(["protect", tiny_llama_dir, "--out", tmp_path / "o", "--order", "500"], capsys)
    assert code == 2 and "--order must be between 1 and" in err
    assert not (tmp_path / "o").exists()


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
