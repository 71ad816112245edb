"""The README and docs/ name only results that exist, and `make figures` knows how to rebuild every one."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RESULT = re.compile(r"results/[\w.{},*-]+")


def expand(name: str) -> list[str]:
    """`a-{x,y}.json` -> [a-x.json, a-y.json] (one brace group, as the docs write them)."""
    match = re.search(r"\{([^}]*)\}", name)
    if not match:
        return [name]
    return [name[:match.start()] + part + name[match.end():] for part in match.group(1).split(",")]


def named_results():
    for doc in DOCS:
        for name in RESULT.findall(doc.read_text(encoding="utf-8")):
            name = name.rstrip(".,")
            if name.endswith(".pkl"):  # a calibration cache the frontier script writes, not a committed result
                continue
            for one in expand(name):
                yield doc.name, one


@pytest.mark.parametrize("doc,name", sorted(set(named_results())))
def test_every_result_the_docs_name_is_committed(doc, name):
    assert list(ROOT.glob(name)), f"{doc} names {name}, which is not in the repository"


def figures_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import figures
    finally:
        sys.path.pop(0)
    return figures


def test_every_committed_result_of_a_figure_is_listed_and_every_figure_has_a_command():
    figures = figures_module()
    assert len({f.id for f in figures.FIGURES}) == len(figures.FIGURES)
    for fig in figures.FIGURES:
        assert fig.steps and fig.commit and fig.where
        assert all(name in figures.RELEASES for name in fig.needs)
    produced = {name for fig in figures.FIGURES for name in fig.outputs}
    for json_result in (ROOT / "results").glob("audit-*.json"):  # the security tables' sources
        assert json_result.name in produced


def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path):
    out = tmp_path / "figures"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "figures.py"), "--all", "--dry", "--only",
                          "audit-default,gpu-check", "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert f"taylormlp protect smollm2-135m-instruct --out {out}/releases/smollm2-default" in run.stdout
    assert f"--json {out}/results/audit-smollm2-default.json" in run.stdout
    assert not out.exists()  # a dry run writes nothing
    if "gpu-check" not in run.stdout.split("would rebuild:")[1].split("\n")[0]:
        assert "gpu-check: needs a CUDA GPU" in run.stdout


def test_an_existing_out_is_refused_without_force(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "figures.py"), "--only", "cli-startup",
                          "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and "--force" in run.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
