"""The counting experts backend: on every MoE family and every experts implementation it covers,
stored counts equal the naive per-token reference (routing from the router's weights) in float64;
an implementation it does not cover falls back to the pre-hook, counted just as exactly; the
backend leaves the model's outputs as they were and is gone after counting, also after an error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers.integrations.moe as moe
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from sparcom.extraction.architectures import ffn_sites
from sparcom.extraction.settings import ExtractionSettings
from sparcom.extraction.counting import FFNCounter, expert_counting_path
from sparcom.extraction.expert_counting import CountingBackend
from sparcom.extraction.extract import extract_to_store
from sparcom.core.models import load_model, resolve_model
from sparcom.extraction.store import open_store, store_attrs

from references import hooked, in_model_order, naive_counts, reference_tokens

MOE_FAMILIES = ["deepseek_v2", "deepseek_v3", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe"]
UNCOVERED = "test-eager-copy"  # an implementation the backend does not know the row order of


@pytest.fixture
def float64_grouped_mm(monkeypatch):
    """grouped_mm in float64: torch's kernel takes only lower precisions, so its fallback
    multiplies; the sorting and grouping of rows, which counting depends on, are the same."""
    monkeypatch.setattr(moe, "_can_use_grouped_mm", lambda *args: False)


@pytest.fixture
def uncovered_implementation():
    ALL_EXPERTS_FUNCTIONS[UNCOVERED] = lambda experts, *args: type(experts).forward.__wrapped__(experts, *args)
    yield UNCOVERED
    del ALL_EXPERTS_FUNCTIONS[UNCOVERED]


def expected_counts(directory, records, span="prompt") -> dict[str, np.ndarray]:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64, experts_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    rows = [naive_counts(model, *reference_tokens(r, tokenizer, span)) for r in records]
    return {name: np.stack([row[name] for row in rows]) for name in rows[0]}


def assert_store_counts(store_path, expected, label: str) -> None:
    store = open_store(store_path)
    assert set(expected) == set(store.data_vars) - {"token_count"}
    for name, values in expected.items():
        np.testing.assert_array_equal(store[name].values, values, err_msg=f"{label} {name}")


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_backend_counts_exactly_in_every_implementation(
        tmp_path, tiny_models, cache_dir, sample_records, float64_grouped_mm, family):  # noqa: F811
    directory = tiny_models(family)
    expected = expected_counts(directory, sample_records)
    loaded = load_model(resolve_model(str(directory)), cache_dir, dtype="float64", device="cpu")
    for implementation in ["eager", "batched_mm", "grouped_mm"]:
        loaded.model.set_experts_implementation(implementation)
        assert expert_counting_path(ffn_sites(loaded.model)) == "backend"
        for max_batch_size, side in [(3, "left"), (64, "right")]:
            settings = ExtractionSettings(max_batch_size=max_batch_size, padding_side=side, shard_size=5)
            store = extract_to_store(loaded, sample_records, tmp_path / f"{implementation}-{side}.zarr", settings)
            assert store_attrs(store)["expert_counting"] == "backend"
            assert_store_counts(store, expected, f"{family} {implementation} {side}")
        assert loaded.model.config._experts_implementation == implementation


@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral"])
def test_uncovered_implementation_falls_back_to_the_pre_hook(
        tmp_path, tiny_models, cache_dir, sample_records, uncovered_implementation, family):  # noqa: F811
    directory = tiny_models(family)
    expected = expected_counts(directory, sample_records)
    loaded = load_model(resolve_model(str(directory)), cache_dir, dtype="float64", device="cpu")
    loaded.model.set_experts_implementation(uncovered_implementation)
    for max_batch_size, side in [(3, "left"), (64, "right")]:
        settings = ExtractionSettings(max_batch_size=max_batch_size, padding_side=side, shard_size=5)
        store = extract_to_store(loaded, sample_records, tmp_path / f"{side}.zarr", settings)
        assert store_attrs(store)["expert_counting"] == "pre_hook"
        assert_store_counts(store, expected, f"{family} pre-hook {side}")


def test_dense_models_record_no_expert_counting(tmp_path, tiny_llama_dir, cache_dir, sample_records):
    loaded = load_model(resolve_model(str(tiny_llama_dir)), cache_dir, dtype="float32", device="cpu")
    store = extract_to_store(loaded, sample_records[:2], tmp_path / "s.zarr", ExtractionSettings())
    assert store_attrs(store)["expert_counting"] == "none"


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_store_names_the_hooked_modules(tmp_path, tiny_models, cache_dir, sample_records,  # noqa: F811
                                        uncovered_implementation, family):
    directory = tiny_models(family)
    config = AutoConfig.from_pretrained(directory)
    dense = set(getattr(config, "mlp_only_layers", []))
    last = config.num_hidden_layers - 1
    loaded = load_model(resolve_model(str(directory)), cache_dir, dtype="float32", device="cpu")
    for implementation, kind in [("eager", "experts_backend"), (uncovered_implementation, "forward_pre_hook")]:
        expected = [hooked(f"model.layers.{last}.mlp", "forward_hook")]
        for i in range(config.num_hidden_layers):
            if i in dense:
                expected.append(hooked(f"model.layers.{i}.mlp.act_fn", "forward_hook", "act_count"))
                continue
            expected.append(hooked(f"model.layers.{i}.mlp.experts", kind, "expert_count", "expert_act_count"))
            if family == "qwen2_moe":
                expected.append(hooked(f"model.layers.{i}.mlp.shared_expert.act_fn", "forward_hook",
                                       "shared_act_count"))
        loaded.model.set_experts_implementation(implementation)
        store = extract_to_store(loaded, sample_records[:2], tmp_path / f"{kind}.zarr", ExtractionSettings())
        assert store_attrs(store)["hooked_modules"] == in_model_order(expected), f"{family} {implementation}"


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_backend_leaves_outputs_unchanged_and_uninstalls(tiny_models, float64_grouped_mm, implementation):  # noqa: F811
    model = AutoModelForCausalLM.from_pretrained(
        tiny_models("qwen2_moe"), dtype=torch.float64, experts_implementation=implementation).eval()
    layers = {layer.experts: slot for slot, layer in enumerate(ffn_sites(model).moe_layers)}
    ids = torch.arange(3, 27).reshape(2, 12)
    with torch.no_grad():
        before = model(ids).logits
        calls = []
        with CountingBackend(layers, lambda *args: calls.append("routes"), lambda *args: calls.append("gates")):
            during = model(ids).logits
    assert torch.equal(before, during)
    assert "routes" in calls and "gates" in calls
    assert model.config._experts_implementation == implementation
    assert not [name for name in ALL_EXPERTS_FUNCTIONS if name.startswith("sparcom")]


def test_backend_is_removed_after_an_error(tiny_models, monkeypatch):  # noqa: F811
    model = AutoModelForCausalLM.from_pretrained(tiny_models("mixtral"), dtype=torch.float64,
                                                 experts_implementation="eager").eval()
    ids = torch.arange(3, 15).reshape(1, 12)
    monkeypatch.setattr(FFNCounter, "_count_routes", lambda self, *args: 1 / 0)
    with pytest.raises(ZeroDivisionError), FFNCounter(ffn_sites(model)) as counter:
        counter.count(model, ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool))
    assert model.config._experts_implementation == "eager"
    assert not [name for name in ALL_EXPERTS_FUNCTIONS if name.startswith("sparcom")]
    with torch.no_grad():
        model(ids)  # runs without the counter's hooks or backend
