"""The release's model card names its base model, the base model's licence field and the taylormlp version."""

import shutil
import tomllib
from pathlib import Path

import pytest

from taylormlp import save_release
from taylormlp.protection.flow import protect
from taylormlp.release.card import base_model, model_card
from taylormlp.protection.flow import protect_to_release
from taylormlp.release.sources import load_base

from conftest import FAST

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
VERSION = tomllib.loads(PYPROJECT.read_text())["project"]["version"]  # read here, not from the package under test

FRONT_MATTER = """---
license: gemma
license_link: https://ai.google.dev/gemma/terms
library_name: transformers
extra:
  license: not-this-one
---
# A model
license: not-this-one-either
"""


def _source_with_readme(tiny_llama_dir, tmp_path, readme):
    source = tmp_path / "base-model"
    shutil.copytree(tiny_llama_dir, source)
    if readme is not None:
        (source / "README.md").write_text(readme)
    return source


def _card(release) -> str:
    return (Path(release) / "README.md").read_text(encoding="utf-8")


def test_card_of_a_protected_directory_names_base_licence_and_version(tiny_llama_dir, tmp_path):
    source = _source_with_readme(tiny_llama_dir, tmp_path, FRONT_MATTER)
    out = tmp_path / "release"
    protect_to_release(source, out, preset="paper", coverage=0.25, **FAST)
    card = _card(out)
    assert f"Made from `{source}` (Hugging Face model directory)" in card
    assert "Licence of the base model: **gemma** (license_link https://ai.google.dev/gemma/terms), from license in " \
           "its README.md front matter." in card
    assert "not-this-one" not in card  # nested keys and text after the front matter are not its licence
    assert f"Written by taylormlp {VERSION}." in card
    assert "| preset | paper |" in card


@pytest.mark.parametrize("readme", [None, "# no front matter\nlicense: zlib-test\n", "---\nlicense: zlib-test\nno closing line\n"])
def test_a_source_without_a_licence_field_is_said_so(tiny_llama_dir, tmp_path, readme):
    source = _source_with_readme(tiny_llama_dir, tmp_path, readme)
    info = base_model(source)
    assert info["license"] is None and info["kind"] == "Hugging Face model directory"
    card = model_card({"basis": "taylor", "order": 8, "coverage": 0.5}, base=info)
    assert "The source states no licence field" in card
    assert "zlib-test" not in card
    assert "the base model's terms apply to it" in card


def test_gguf_metadata_licence(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "m.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("Tiny Test Model")
    writer.add_license("apache-2.0")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    info = base_model(path)
    assert (info["kind"], info["license"], info["name"]) == ("GGUF file", "apache-2.0", "Tiny Test Model")
    card = model_card({"basis": "chebyshev", "order": 8, "coverage": 1.0}, base=info)
    assert "Licence of the base model: **apache-2.0**, from general.license in its GGUF metadata." in card
    assert "named 'Tiny Test Model' in its metadata" in card


def test_python_api_release_names_the_directory_it_was_loaded_from(tiny_llama_dir, tmp_path):
    source = _source_with_readme(tiny_llama_dir, tmp_path, "---\nlicense: apache-2.0\n---\n")
    model, tokenizer, _ = load_base(source)
    protect(model, tokenizer, preset="paper", coverage=0.25, **FAST)
    out = save_release(model, tmp_path / "api-release", tokenizer)
    card = _card(out)
    assert f"Made from `{source}`" in card
    assert "**apache-2.0**" in card
    assert f"Written by taylormlp {VERSION}." in card


def test_unknown_source_is_said_unknown():
    card = model_card({"basis": "taylor", "order": 8, "coverage": 0.1}, base=base_model(None))
    assert "## Base model\n\nNot recorded" in card
    sections = card.split("\n\n")
    assert sections[0] == "# TaylorMLP release"  # the card is its sections, in order, blank-line separated


def test_citation_names_this_version_and_the_paper():
    import yaml

    citation = yaml.safe_load((PYPROJECT.parent / "CITATION.cff").read_text(encoding="utf-8"))
    assert citation["version"] == VERSION  # bump CITATION.cff with pyproject.toml
    assert citation["license"] == tomllib.loads(PYPROJECT.read_text())["project"]["license"]
    paper = citation["preferred-citation"]
    assert paper["title"].startswith("Taylor Unswift") and paper["authors"][0]["family-names"] == "Wang"
