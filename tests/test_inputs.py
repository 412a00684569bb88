"""Bad records, settings and model names fail with messages that say where and what."""

from __future__ import annotations

import json

import pytest

from sparcom.config import load_settings
from sparcom.curation.dataset import load_records, save_dataset
from sparcom.curation.starter import prepare_dataset
from sparcom.core.models import ModelLoadError, ModelSource, model_fingerprint, resolve_model
from sparcom.curation.records import RecordError, dataset_hash, read_jsonl


GOOD = {"id": "a", "category": "QA", "origin": "ai", "source": "s", "instruction": "Why?",
        "input": "", "response": "Because.", "license": "CC0-1.0"}


def write_lines(path, lines):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("change,message", [
    ({"category": "POEM"}, "category"),
    ({"instruction": "  "}, "instruction"),
    ({"response": 3}, "response"),
    ({"origin": "robot"}, "origin"),
    ({"extra": "x"}, "extra"),
])
def test_bad_record_names_file_line_and_field(tmp_path, change, message):
    bad = {**GOOD, "id": "b", **change}
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD).encode(), json.dumps(bad).encode()])
    with pytest.raises(RecordError, match=rf"d.jsonl:2 \(id 'b'\):.*{message}"):
        read_jsonl(path)


def test_missing_field_duplicate_id_bad_json_and_bad_utf8(tmp_path):
    missing = {k: v for k, v in GOOD.items() if k != "response"}
    with pytest.raises(RecordError, match="d.jsonl:1.*response"):
        read_jsonl(write_lines(tmp_path / "d.jsonl", [json.dumps(missing).encode()]))
    with pytest.raises(RecordError, match="duplicate id 'a'"):
        read_jsonl(write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD).encode()] * 2))
    with pytest.raises(RecordError, match="d.jsonl:1: not valid JSON"):
        read_jsonl(write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD).encode()[:30]]))
    with pytest.raises(RecordError, match="d.jsonl:1: invalid UTF-8"):
        read_jsonl(write_lines(tmp_path / "d.jsonl", [b'{"id": "\xff"}']))


def test_saved_dataset_round_trips_with_manifest(tmp_path, sample_records):
    manifest = save_dataset(sample_records, tmp_path / "ds")
    assert load_records(tmp_path / "ds") == sample_records
    assert manifest.dataset_hash == dataset_hash(sample_records)
    assert manifest.counts["CODE"] == {"ai": 1, "human": 1}
    assert len(manifest.record_hashes) == len(sample_records)
    assert not (tmp_path / "ds.partial").exists()


def test_dataset_hash_follows_content(sample_records):
    edited = [sample_records[0].model_copy(update={"response": "Positive."})] + sample_records[1:]
    assert dataset_hash(edited) != dataset_hash(sample_records)
    assert dataset_hash(list(reversed(sample_records))) != dataset_hash(sample_records)


def test_starter_set_is_balanced_and_stable(tmp_path):
    first = prepare_dataset(None, tmp_path)
    records = load_records(first)
    per_category = {c: sum(r.category == c for r in records) for c in {r.category for r in records}}
    assert sorted(per_category) == ["CLS", "CODE", "GEN", "MATH", "QA", "SUM"]
    assert set(per_category.values()) == {20}
    assert all(r.response.strip() for r in records)
    assert prepare_dataset(None, tmp_path) == first


def test_settings_yaml_then_overrides(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("model:\n  name: my/model\nidentification:\n  epsilon: 0.05\n  rule: layer_percentile\n")
    settings = load_settings(path, {"identification.epsilon": 0.02, "extraction.span": None})
    assert settings.model.name == "my/model"
    assert settings.identification.epsilon == 0.02
    assert settings.identification.rule == "layer_percentile"
    assert settings.extraction.span == "prompt"
    path.write_text("identification:\n  epsilon: 2\n")
    with pytest.raises(ValueError, match="epsilon"):
        load_settings(path)
    path.write_text("identifcation: {}\n")
    with pytest.raises(ValueError, match="identifcation"):
        load_settings(path)


def test_model_resolution_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_model(str(tmp_path / "empty"))
    assert resolve_model("default").kind == "gguf"


def test_fingerprint_follows_weight_content(tmp_path):
    (tmp_path / "m").mkdir()
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(b"one")
    source = ModelSource("m", "directory", tmp_path / "m")
    first = model_fingerprint(source, tmp_path / "cache")
    assert model_fingerprint(source, tmp_path / "cache") == first
    weights.write_bytes(b"two")
    assert model_fingerprint(source, tmp_path / "cache") != first
