"""Every supported family, dense and MoE: stored counts equal a naive per-token computation in
float64 (one prompt at a time, no padding, the full model with its LM head)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparcom.extraction.architectures import UnsupportedArchitecture, ffn_sites
from sparcom.extraction.settings import ExtractionSettings
from sparcom.extraction.extract import extract_to_store
from sparcom.core.models import load_model, resolve_model
from sparcom.extraction.store import open_store

from builders import CONFIGS
from references import naive_counts, reference_tokens


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_counts_are_exact_for_every_family(tmp_path, tiny_models, cache_dir, sample_records, family):
    directory = tiny_models(family)
    loaded = load_model(resolve_model(str(directory)), cache_dir, dtype="float64", device="cpu")
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float64, experts_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    spans = ["prompt", "response"] if family in ("qwen2_moe", "deepseek_v3", "mixtral") else ["prompt"]
    # Gemma2's eager attention overflows its float64 mask under left padding (NaN, refused below).
    sides = ["right"] if family == "gemma2" else ["left", "right"]
    for span in spans:
        expected = [naive_counts(model, *reference_tokens(r, tokenizer, span)) for r in sample_records]
        for max_batch_size, side in [(3, sides[0]), (64, sides[-1])]:
            settings = ExtractionSettings(span=span, max_batch_size=max_batch_size, padding_side=side,
                                          shard_size=5)
            store = open_store(extract_to_store(
                loaded, sample_records, tmp_path / f"{span}-{max_batch_size}.zarr", settings))
            assert set(expected[0]) == set(store.data_vars) - {"token_count"}
            for name in expected[0]:
                np.testing.assert_array_equal(
                    store[name].values, np.stack([e[name] for e in expected]), err_msg=f"{family} {name}")


def test_nan_activations_are_refused(tmp_path, tiny_models, cache_dir, sample_records):
    loaded = load_model(resolve_model(str(tiny_models("gemma2"))), cache_dir, dtype="float64", device="cpu")
    with pytest.raises(FloatingPointError, match="NaN at counted tokens"):
        extract_to_store(loaded, sample_records, tmp_path / "s.zarr", ExtractionSettings(padding_side="left"))


def test_moe_store_layout_follows_spec(tmp_path, tiny_models, cache_dir, sample_records):
    loaded = load_model(resolve_model(str(tiny_models("deepseek_v3"))), cache_dir, dtype="float32", device="cpu")
    store = open_store(extract_to_store(loaded, sample_records, tmp_path / "s.zarr", ExtractionSettings()))
    assert store.act_count.dims == ("instruction", "layer", "neuron")
    assert list(store.layer.values) == [0]
    assert store.expert_act_count.dims == ("instruction", "moe_layer", "expert", "expert_neuron")
    assert list(store.moe_layer.values) == [1, 2]
    assert dict(store.expert_count.sizes) == {"instruction": 12, "moe_layer": 2, "expert": 4}
    assert store.shared_act_count.sizes["shared_neuron"] == 32  # two shared experts of 16
    # top-2 routing: each counted token is routed to exactly two experts
    np.testing.assert_array_equal(store.expert_count.sum("expert").values,
                                  2 * np.broadcast_to(store.token_count.values[:, None], (12, 2)))


def test_unsupported_architecture_is_named(tokenizer_dir):
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=32, is_decoder=True)
    model = transformers.BertLMHeadModel(config)
    with pytest.raises(UnsupportedArchitecture, match="'bert' is not supported; supported: deepseek_v2"):
        ffn_sites(model)
