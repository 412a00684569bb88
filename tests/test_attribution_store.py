"""ATTR.zarr: every record's estimates as the alpha definition gives them (tests/references.py),
under the count store's names with true layer indices; a partial, killed or damaged store
resumes to the same values; a record without a response is refused by name before any model
loads; the command line writes the same store."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.app import app
from sparcom.attribution.schema import MAX_RESPONSE_TOKENS, NLL_DEFINITION, RESPONSE_TOKENS
from sparcom.attribution.settings import AttributionSettings
from sparcom.attribution.store import attribute_to_store, open_attribution
from sparcom.core.models import load_model, resolve_model
from sparcom.extraction.settings import ExtractionSettings
from sparcom.extraction.store import StoreError, is_complete, store_attrs

from builders import SAMPLE_TEXTS, make_record, write_jsonl
from references import attribution_reference

K = 4


@pytest.fixture(scope="module")
def records():
    return [make_record(i, *texts) for i, texts in enumerate(SAMPLE_TEXTS)]


@pytest.fixture(scope="module")
def moe(tiny_models, cache_dir):
    """Qwen2-MoE: a dense layer 0, then MoE layers 1 and 2 with a shared expert."""
    return load_model(resolve_model(str(tiny_models("qwen2_moe"))), cache_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def expected(moe, records):
    exact = copy.deepcopy(moe.model).double()
    exact.set_experts_implementation("eager")
    return [attribution_reference(exact, record, moe.tokenizer, K) for record in records]


def assert_store_holds(path, expected):
    store = open_attribution(path)
    for row, reference in enumerate(expected):
        for name, values in reference.items():
            got = store[name].values[row]
            scale = np.abs(values).max(axis=tuple(range(1, values.ndim)), keepdims=True)
            assert (np.abs(got - values) <= 1e-4 * scale).all(), f"{name} row {row}"
    return store


SETTINGS = AttributionSettings(max_response_tokens=K)
EXTRACTION = ExtractionSettings(shard_size=5, max_batch_size=3, max_padding=0.5)


def test_the_store_holds_every_records_estimates_under_the_count_stores_names(tmp_path, moe, records, expected):
    path = attribute_to_store(moe, records, tmp_path / "ATTR.zarr", SETTINGS, EXTRACTION)
    store = assert_store_holds(path, expected)
    assert store["act_attribution"].dims == ("instruction", "layer", "neuron")
    assert store["expert_act_attribution"].dims == ("instruction", "moe_layer", "expert", "expert_neuron")
    assert store["shared_act_attribution"].dims == ("instruction", "moe_layer", "shared_neuron")
    assert store["expert_attribution"].dtype == np.float32
    assert store.layer.values.tolist() == [0] and store.moe_layer.values.tolist() == [1, 2]  # true indices
    assert store.instruction_id.values.tolist() == [r.id for r in records]
    assert store.category.values.tolist() == [r.category for r in records]
    tokens = [min(K, len(moe.tokenizer(r.response, add_special_tokens=False)["input_ids"])) for r in records]
    assert store[RESPONSE_TOKENS].values.tolist() == tokens
    attrs = store_attrs(path)
    assert attrs[MAX_RESPONSE_TOKENS] == K and "teacher-forced" in attrs[NLL_DEFINITION]
    assert attrs["model_fingerprint"] == moe.fingerprint and attrs["dtype"] == "float32"


def test_a_partial_killed_or_damaged_store_resumes_to_the_same_values(tmp_path, moe, records, expected, monkeypatch):
    path = tmp_path / "ATTR.zarr"
    attribute_to_store(moe, records, path, SETTINGS, EXTRACTION, shards=[1])
    assert not is_complete(path)
    with pytest.raises(StoreError, match="has not finished"):
        open_attribution(path)

    import sparcom.attribution.store as writer

    real = writer.write_shard
    written = []

    def killed_after_one_shard(store, shard, values):
        if written:
            raise KeyboardInterrupt
        written.append(shard)
        real(store, shard, values)

    monkeypatch.setattr(writer, "write_shard", killed_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        attribute_to_store(moe, records, path, SETTINGS, EXTRACTION)
    monkeypatch.setattr(writer, "write_shard", real)
    assert written == [0] and not is_complete(path)
    attribute_to_store(moe, records, path, SETTINGS, EXTRACTION)
    assert_store_holds(path, expected)

    chunk = next((path / "expert_attribution" / "c").rglob("*"))
    shutil.rmtree(chunk) if chunk.is_dir() else chunk.unlink()
    with pytest.raises(StoreError, match="damaged store"):
        open_attribution(path)
    attribute_to_store(moe, records, path, SETTINGS, EXTRACTION)  # recomputes the damaged shard only
    assert_store_holds(path, expected)


def test_a_store_of_other_settings_is_refused(tmp_path, moe, records):
    path = attribute_to_store(moe, records[:2], tmp_path / "ATTR.zarr", SETTINGS, EXTRACTION)
    with pytest.raises(StoreError, match="holds results for other settings"):
        attribute_to_store(moe, records[:2], path, AttributionSettings(max_response_tokens=K + 1), EXTRACTION)


def test_the_command_refuses_a_record_without_a_response_before_loading_the_model(tmp_path, records):
    blank = records[3].model_copy(update={"response": " "})
    data = tmp_path / "data.jsonl"
    data.write_text(records[0].model_dump_json() + "\n" + blank.model_dump_json() + "\n")
    result = CliRunner().invoke(app, ["attribute", "--model", str(tmp_path / "no-such-model"), "--dataset", str(data),
                                      "--out", str(tmp_path / "ATTR.zarr")])
    assert result.exit_code == 2, result.output
    assert "t-003" in result.output and "response" in result.output and "no-such-model" not in result.output
    assert not (tmp_path / "ATTR.zarr").exists()


def test_the_command_writes_the_store(tmp_path, tiny_models, records, moe, expected):
    data = write_jsonl(records, tmp_path / "data.jsonl")
    out = tmp_path / "ATTR.zarr"
    result = CliRunner().invoke(app, ["attribute", "--model", str(tiny_models("qwen2_moe")), "--dataset", str(data),
                                      "--out", str(out), "--max-response-tokens", str(K), "--dtype", "float32",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert_store_holds(out, expected)
    assert torch.is_grad_enabled()


def test_dask_workers_fill_the_same_store(tmp_path, tiny_models, cache_dir, records, expected):
    """Two in-process workers, each with the model loaded once, fill the shards between them."""
    from distributed import Client, LocalCluster

    from sparcom.attribution.store import attribute_on_cluster
    from sparcom.extraction.distributed import FILLERS
    from sparcom.extraction.settings import ModelSettings

    model = ModelSettings(name=str(tiny_models("qwen2_moe")))
    extraction = EXTRACTION.model_copy(update={"device": "cpu", "dtype": "float32"})
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        path = attribute_on_cluster(client, model, records, tmp_path / "ATTR.zarr", SETTINGS, extraction, {},
                                    cache_dir)
    assert_store_holds(path, expected)
    assert sorted(store_attrs(path)[FILLERS]) == ["0", "1", "2"]
