"""Public-set adapters on local files in each set's real column format (no hub in tests)."""

from __future__ import annotations

import datasets
import pytest
from hub_standins import FAULTS, write_standins

from sparcom.curation import sources
from sparcom.curation.sources import SourceError, SourceSpec, default_sources, source_pool, source_rows


@pytest.fixture(autouse=True)
def local_datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    return write_standins(tmp_path_factory.mktemp("standins"), rows=30)


def test_every_default_source_maps_its_columns(standins):
    pools = {spec.name: source_pool(spec) for spec in standins}
    assert set(pools) == {"ag_news", "sst2", "humaneval", "trivia_qa", "alpaca", "math500", "cnn_dailymail"}
    for spec in standins:
        pool = pools[spec.name]
        assert pool.unavailable is None and not pool.strict
        assert all(r.category == spec.category and r.origin == "human" for r in pool.records)
        assert len({r.id for r in pool.records}) == len(pool.records)
        assert [r.stage for r in pool.rejected] == ["invalid"] * FAULTS[spec.name].get("invalid", 0)
    first_code = pools["humaneval"].records[0]
    assert first_code.id == "humaneval-HumanEval-0" and first_code.license == "MIT"
    assert first_code.input.startswith("def f0(x):") and first_code.response.endswith("    return x\n")
    trivia = pools["trivia_qa"].records[0]
    assert trivia.id == "trivia_qa-tq_0" and trivia.input == "" and trivia.response[0].isupper()
    assert pools["ag_news"].records[1].response == "Sports"  # label 1 by the configured names
    assert pools["ag_news"].records[0].instruction.endswith("- Science/Tech")
    assert pools["math500"].records[3].response == "It is \\boxed{6}."
    assert {r.input == "" for r in pools["alpaca"].records} == {True, False}
    unlabelled = pools["sst2"].rejected[0]
    assert unlabelled.where == "sst2 row 3" and "label label=-1" in unlabelled.reason
    empty = pools["alpaca"].rejected[0]
    assert empty.record_id == "alpaca-000010" and "response" in empty.reason


def test_class_label_feature_names_labels_without_configuration():
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    table = datasets.Dataset.from_dict({"sentence": ["dull", "fun"], "label": [0, 1]}, features=features)
    spec = SourceSpec(name="s", category="CLS", dataset="stanfordnlp/sst2", split="validation",
                      instruction="Sentiment?", input="{sentence}", response="{label}", license="unknown")
    assert [row.data["response"] for row in source_rows(spec, table)] == ["negative", "positive"]
    assert source_rows(spec, table)[0].data["source"] == "stanfordnlp/sst2:validation"


def test_template_naming_a_missing_column_is_a_clear_error(standins):
    spec = standins[2].model_copy(update={"response": "{solution}"})
    with pytest.raises(SourceError, match=r"'humaneval'.*no column\(s\) solution; its columns are .*canonical_solution"):
        source_pool(spec)
    with pytest.raises(ValueError, match="column or column\\[key\\] only"):
        SourceSpec(**{**default_sources()[0].model_dump(), "response": "{label.__class__}"})


def test_unreachable_hub_and_missing_files_say_so(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "hub_unreachable", lambda: "the hub cannot be reached: no network")
    monkeypatch.setattr(sources, "load_table", lambda spec: pytest.fail("must not try the hub"))
    pool = source_pool(default_sources()[2])
    assert pool.records == [] and pool.rows_read == 0
    assert pool.unavailable == ("humaneval (openai/openai_humaneval, split test) is unavailable: "
                                "the hub cannot be reached: no network")
    monkeypatch.undo()
    missing = default_sources()[5].model_copy(update={
        "dataset": "json", "data_files": str(tmp_path / "nope.jsonl"), "config": None, "split": "train"})
    pool = source_pool(missing)
    assert "math500" in pool.unavailable and "nope.jsonl" in pool.unavailable


def test_default_sources_cover_every_category_with_licenses():
    specs = default_sources()
    assert {s.category for s in specs} == {"CLS", "CODE", "QA", "GEN", "MATH", "SUM"}
    assert len({s.name for s in specs}) == len(specs)
    assert all(s.license and not s.is_local() for s in specs)
