"""The seam for engines (measure/engines.py): one registry row and one module make an engine, and every command
that runs one takes it from there."""

import sys

import pytest

from taylormlp.cli import main
from taylormlp.common.choices import DEFAULT_ENGINE, ENGINES, EngineRow, engine_names
from taylormlp.common.errors import TaylorMLPError
from taylormlp.measure import engines

NEEDS = {"bench": ("start", "rows", "record", "bench", "in_process", "prior"),
         "protect": ("start", "rows", "record", "in_process", "prior"), "serve": ("serve",)}

FAKE = '''
from taylormlp.measure.engines import BenchRequest, ServeRequest

SEEN = []


class FakeEngine:
    name = "fake"

    def require(self):
        SEEN.append("require")

    def bench(self, request: BenchRequest) -> dict:
        SEEN.append(("bench", request))
        return {}

    def serve(self, request: ServeRequest) -> int:
        SEEN.append(("serve", request))
        return 0


ENGINE = FakeEngine()
'''


def test_every_row_resolves_to_an_engine_with_what_its_commands_need():
    for name, row in ENGINES.items():
        engine = engines.get(name, row.commands[0])
        assert engine.name == name and callable(engine.require)
        for command in row.commands:
            missing = [m for m in NEEDS[command] if not hasattr(engine, m)]
            assert not missing, (name, command, missing)


def test_each_command_lists_its_engines_default_first():
    for command, default in DEFAULT_ENGINE.items():
        names = engine_names(command)
        assert names[0] == default and set(names) == {n for n, r in ENGINES.items() if command in r.commands}
    assert "vllm" in engine_names("serve") and "taylormlp" not in engine_names("serve")


def test_an_engine_a_command_does_not_offer_is_refused_with_the_ones_it_does():
    with pytest.raises(TaylorMLPError, match="unknown engine 'transformers' for bench; choose one of taylormlp, vllm"):
        engines.get("transformers", "bench")


def test_a_new_engine_is_one_module_and_one_row(tiny_release, tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """A module written here and a row added to the registry: bench and serve offer it and hand it their request;
    nothing else was changed."""
    (tmp_path / "fake_engine_module.py").write_text(FAKE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(ENGINES, "fake", EngineRow("fake_engine_module", ("bench", "serve"), "a test engine"))
    assert main(["bench", str(tiny_llama_dir), str(tiny_release), "--engine", "fake", "--batch-sizes", "4",
                 "--repeats", "2"]) == 0
    assert main(["serve", str(tiny_release), "--engine", "fake", "--port", "8123"]) == 0
    seen = sys.modules["fake_engine_module"].SEEN
    (_, bench), (_, serve) = seen
    assert bench.releases == (tiny_release,) and bench.batch_sizes == [4] and bench.repeats == 2
    assert serve.release == tiny_release and serve.port == 8123
    with pytest.raises(SystemExit):  # its row does not offer protect
        main(["protect", str(tiny_llama_dir), "--out", str(tmp_path / "r"), "--slowdown", "2", "--engine", "fake"])
    assert "invalid choice: 'fake'" in capsys.readouterr().err
