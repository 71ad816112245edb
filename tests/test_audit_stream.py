"""The streamed audit (audit_stream.py): the closed-form attacks read a release layer by layer and give the same
numbers as the audit of the release loaded whole."""

from __future__ import annotations

import json

import pytest

from taylormlp.attacks.audit import run_audit
from taylormlp.cli import main

CLOSED_FORM = ["coefficient_ratio", "factorization"]
SAME = {"coefficient_ratio": ("relative_weight_error", "per_layer_max", "sign_accuracy", "misfit_max",
                              "theta_residual_max", "channels"),
        "factorization": ("weight_error_up_to_scale", "rank1_residual_max")}


@pytest.fixture(scope="module")
def both(tiny_release, tiny_llama_dir):
    from taylormlp.attacks.context import AuditOptions

    options = AuditOptions(attack_options={"factorization": {"speed": False}})
    whole = run_audit(tiny_release, original=tiny_llama_dir, attacks=CLOSED_FORM, options=options,
                      print_table=False, stream=False)
    streamed = run_audit(tiny_release, original=tiny_llama_dir, attacks=CLOSED_FORM, options=options,
                         print_table=False, stream=True)
    return whole, streamed


def test_streamed_attacks_give_the_whole_audits_numbers(both):
    whole, streamed = both
    assert streamed["streamed"] and not whole.get("streamed")
    for name, keys in SAME.items():
        w, s = whole["attacks"][name], streamed["attacks"][name]
        for key in keys:
            assert s[key] == pytest.approx(w[key], rel=1e-9, abs=1e-15), (name, key, s[key], w[key])
    assert streamed["attacks"]["coefficient_ratio"]["relative_weight_error"] < 1e-3  # and they are real numbers
    assert streamed["protected_channels"] == whole["protected_channels"]


def test_streamed_report_says_what_it_did_not_do(both):
    _, streamed = both
    for name in CLOSED_FORM:
        out = streamed["attacks"][name]
        assert out["tokens"] is None and out["queries"] == 0 and out["wall_time_s"] > 0
    assert streamed["attacks"]["factorization"]["block_relative_diff"] < 1e-4  # the collapse checked on random x
    assert "collapsed to one matmul" in streamed["attacks"]["factorization"]["verdict"]
    assert "weights recovered" in streamed["attacks"]["coefficient_ratio"]["verdict"]
    assert streamed["peak_rss_bytes"] > 0


def test_without_an_original_the_self_checks_judge(tiny_release):
    report = run_audit(tiny_release, attacks=["coefficient_ratio"], print_table=False, stream=True)
    out = report["attacks"]["coefficient_ratio"]
    assert out["relative_weight_error"] is None and "no original to score" in out["verdict"]


def test_cli_stream_writes_the_table_and_json(tiny_release, tmp_path, capsys):
    path = tmp_path / "audit.json"
    code = main(["audit", str(tiny_release), "--stream", "--attacks", "coefficient_ratio,factorization",
                 "--json", str(path)])
    assert code == 0
    assert "streamed layer by layer" in capsys.readouterr().out
    assert json.loads(path.read_text())["streamed"] is True


def test_stream_refuses_attacks_that_run_the_model(tiny_release, capsys):
    code = main(["audit", str(tiny_release), "--stream", "--attacks", "coefficient_ratio,regression"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1
    assert "regression" in err[0] and "--attacks coefficient_ratio" in err[0]


def test_a_big_release_streams_by_itself(tiny_release, monkeypatch):
    from taylormlp.attacks import audit

    monkeypatch.setattr(audit, "available_memory", lambda: 1000)  # bytes: any release is "more than half" of it
    assert audit.should_stream(tiny_release, CLOSED_FORM, None)
    assert not audit.should_stream(tiny_release, CLOSED_FORM + ["regression"], None)
    monkeypatch.setattr(audit, "available_memory", lambda: 1 << 50)
    assert not audit.should_stream(tiny_release, CLOSED_FORM, None)
