"""Content keys and code versions: a code version follows a stage's imports, ignores comments and
docstrings, changes with the code and refuses a missing module; each stage has one key, the same
for the caching (computed before the stage runs) and for the result it names."""

from __future__ import annotations

import importlib
import textwrap
from pathlib import Path

import pytest

from sparcom.config import ExtractionSettings, ModelSettings
from sparcom.curation.dataset import prepare_dataset
from sparcom.extraction.extract import extract_dataset
from sparcom.provenance import modules_version, planned_extraction_key, stage_modules
from sparcom.extraction.store import store_attrs


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A package `verpkg` on sys.path: `a` imports `b` inside a function, `b` imports nothing."""
    root = tmp_path / "verpkg"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text(textwrap.dedent('''\
        """Module a."""
        import json


        def use():
            from verpkg.b import value  # only where it is needed
            return json.dumps(value())
        '''))
    (root / "b.py").write_text(textwrap.dedent('''\
        """Module b."""


        def value():
            """The value."""
            return 1  # one
        '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    return root


def version(package: Path) -> str:
    return modules_version(["verpkg.a"], package="verpkg")


def test_comments_and_docstrings_keep_the_version(package):
    before = version(package)
    b = package / "b.py"
    b.write_text(b.read_text().replace('"""The value."""', '"""The value, documented at length."""')
                 .replace("# one", "# the number one, as a comment") + "\n# a closing remark\n")
    (package / "a.py").write_text((package / "a.py").read_text().replace('"""Module a."""', '"""A, renamed."""'))
    assert version(package) == before


def test_a_code_edit_in_an_imported_module_changes_the_version(package):
    before = version(package)
    b = package / "b.py"
    b.write_text(b.read_text().replace("return 1", "return 2"))
    assert version(package) != before


def test_a_missing_module_is_an_error_not_a_skip(package):
    (package / "a.py").write_text("from verpkg.gone import thing\n")
    with pytest.raises(ModuleNotFoundError, match=r"verpkg\.gone \(imported by verpkg\.a\) is not found"):
        version(package)
    with pytest.raises(ModuleNotFoundError, match="verpkg.nothere"):
        modules_version(["verpkg.nothere"], package="verpkg")


def test_stage_modules_follow_the_imports():
    extraction = stage_modules("extract")
    # extraction reads its settings (config) and records (records) as much as it counts
    assert {"sparcom.extraction.extract", "sparcom.extraction.counting", "sparcom.extraction.models", "sparcom.config", "sparcom.curation.records",
            "sparcom.extraction.store"} <= set(extraction)
    assert "sparcom.identification.identify" not in extraction and "sparcom.provenance" not in extraction
    assert "sparcom.extraction.extract" not in stage_modules("identify")
    assert {"sparcom.identification.report", "sparcom.identification.generality"} <= set(stage_modules("analyse"))


def test_extraction_has_one_key(tmp_path, tiny_llama_dir, cache_dir, sample_records):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(r.model_dump_json() + "\n" for r in sample_records[:4]))
    dataset_dir = prepare_dataset(data, tmp_path / "datasets")
    model, settings = ModelSettings(name=str(tiny_llama_dir)), ExtractionSettings(dtype="float32", device="cpu")
    planned = planned_extraction_key(model, dataset_dir, settings, cache_dir)
    store = extract_dataset(model, dataset_dir, settings, tmp_path / "stores", cache_dir)
    assert store_attrs(store)["extraction_key"] == planned and store.stem.endswith(planned[:16])
