"""The pre-flight (preflight.py, `taylormlp protect --dry-run`): estimated release size against real tiny
protects, and runs that cannot fit refused before calibration, one line, exit 2, nothing written."""

from __future__ import annotations

import re

import pytest

from conftest import FAST, save_tiny_chat_model
from taylormlp.protection import flow
from taylormlp.protection import preflight
from taylormlp.common import machine
from taylormlp.cli import main
from taylormlp.protection.options import ProtectOptions
from taylormlp.protection.flow import protect_to_release
from taylormlp.release.directory import release_size


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory, smol_tokenizer):
    """A tiny Llama whose MLPs, not its embeddings, make most of a release (hidden 16, 2048 channels, 3 layers)."""
    return save_tiny_chat_model(tmp_path_factory.mktemp("wide") / "wide", smol_tokenizer, hidden=16, inter=2048,
                           layers=3)


RUN = dict(calibration_samples=4, **FAST)


def _estimate(model_dir, out, dtype="float32", **kw):
    return preflight.estimate(model_dir, ProtectOptions(**kw, **RUN), dtype, out)


@pytest.mark.parametrize("dtype, coverage", [("float32", 1.0), ("bfloat16", 0.5)])
def test_release_size_estimate_matches_a_real_protect(wide_dir, tmp_path, dtype, coverage):
    est = _estimate(wide_dir, tmp_path / "rel", dtype, preset="paper", coverage=coverage)
    assert est.exact
    protect_to_release(wide_dir, tmp_path / "rel", preset="paper", coverage=coverage, dtype=dtype, **RUN)
    actual = release_size(tmp_path / "rel")
    assert abs(est.release_bytes - actual) <= 0.2 * actual, (est.release_bytes, actual)
    # the MLPs dominate: Θ alone is 16·9·2048·3·coverage values; the embedding is 49152·16
    assert actual > 2 * len(range(49152)) * 16 * (4 if dtype == "float32" else 2)


def test_pieces_make_a_bound(wide_dir, tmp_path):
    """The default preset (up to 8 pieces per channel): the real release lies between one piece per channel and
    max_pieces in every channel."""
    est = _estimate(wide_dir, tmp_path / "rel", preset="default", coverage=1.0)
    assert not est.exact and est.max_pieces == 8
    protect_to_release(wide_dir, tmp_path / "rel", preset="default", coverage=1.0, **RUN)
    actual = release_size(tmp_path / "rel")
    assert est.release_floor_bytes * 0.98 <= actual <= est.release_bytes


def test_peak_memory_counts_the_resident_tensors_twice(wide_dir, tmp_path):
    est = _estimate(wide_dir, tmp_path / "rel", preset="paper", coverage=0.5)
    embedding = 49152 * 16 * 4 + 16 * 4  # tied embedding and the final norm, float32
    assert est.parts["resident tensors"] == int(preflight.RESIDENT_FACTOR * embedding)
    assert est.peak_bytes == sum(est.parts.values())
    bigger = _estimate(wide_dir, tmp_path / "rel", preset="paper", coverage=1.0)
    assert est.parts["one layer"] == max(est.phases.values())
    assert bigger.phases["candidate"] > est.phases["candidate"]  # the candidate grows with the coverage
    assert bigger.phases["calibration"] == est.phases["calibration"]


@pytest.fixture
def no_calibration(monkeypatch):
    def calibrate(*args, **kwargs):
        raise AssertionError("calibration ran: the pre-flight should have refused first")
    monkeypatch.setattr(flow, "calibrate", calibrate)


def _one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def test_release_bigger_than_the_disk_is_refused_before_calibration(wide_dir, tmp_path, monkeypatch, capsys,
                                                                    no_calibration):
    seen = []
    monkeypatch.setattr(preflight, "free_space", lambda path: seen.append(path) or 10_000)
    out = tmp_path / "deep" / "rel"
    code = main(["protect", str(wide_dir), "--out", str(out), "--preset", "paper", "--coverage", "0.5"])
    assert code == 2
    line = _one_line(capsys)
    assert line.startswith("taylormlp protect: error: the release will need ")
    assert re.search(r"will need \d+ MB \(float32, coverage 0\.5, one piece per channel, order 8\) but \S+ has 0 MB "
                     r"free; nothing was done", line), line
    for way in ("--dtype bfloat16", "a lower --coverage", "a lower --order", "another --out"):
        assert way in line, line
    assert "--max-pieces 1" not in line  # the paper preset has one piece per channel already
    assert seen == [out] and list(tmp_path.iterdir()) == []  # nothing written, not even --out's parent


def test_searched_coverage_is_checked_at_its_bound(wide_dir, tmp_path, monkeypatch, capsys, no_calibration):
    bound = _estimate(wide_dir, tmp_path / "rel", "bfloat16", preset="default").release_bytes
    monkeypatch.setattr(preflight, "free_space", lambda path: bound - 1)
    code = main(["protect", str(wide_dir), "--out", str(tmp_path / "rel"), "--dtype", "bfloat16"])
    assert code == 2
    line = _one_line(capsys)
    assert "may need up to" in line and "searched" in line and "--max-pieces 1" in line
    assert "--dtype bfloat16" not in line  # already given


def test_peak_above_the_available_memory_is_refused(wide_dir, tmp_path, monkeypatch, capsys, no_calibration):
    monkeypatch.setattr(machine, "available_memory", lambda: 1 << 20)
    code = main(["protect", str(wide_dir), "--out", str(tmp_path / "rel"), "--preset", "paper", "--coverage", "1"])
    assert code == 2
    line = _one_line(capsys)
    assert "of memory at its peak" in line and "1 MB is available" not in line and "--dtype bfloat16" in line
    assert list(tmp_path.iterdir()) == []


def test_dry_run_prints_the_table_and_writes_nothing(wide_dir, tmp_path, capsys, no_calibration):
    before = sorted(p.name for p in wide_dir.iterdir())
    code = main(["protect", str(wide_dir), "--out", str(tmp_path / "rel"), "--preset", "paper", "--coverage", "0.5",
                 "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert "release size" in out and "peak memory" in out and "time" in out and "nothing was written" in out
    assert list(tmp_path.iterdir()) == [] and sorted(p.name for p in wide_dir.iterdir()) == before


def test_dry_run_of_a_run_that_would_be_refused_says_so(wide_dir, tmp_path, monkeypatch, capsys, no_calibration):
    monkeypatch.setattr(preflight, "free_space", lambda path: 0)
    code = main(["protect", str(wide_dir), "--out", str(tmp_path / "rel"), "--dry-run"])
    captured = capsys.readouterr()
    assert code == 2 and "release size" in captured.out
    assert "may need up to" in captured.err and list(tmp_path.iterdir()) == []
