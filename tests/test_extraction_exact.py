"""Stored counts equal an independent naive computation: one prompt at a time, no padding,
a hook on the gate projection, f(gate) > 0 counted over the span's tokens."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import xarray as xr
from transformers import AutoConfig

from sparcom.extraction.settings import ExtractionSettings
from sparcom.extraction.extract import extract_to_store
from sparcom.core.models import load_model, resolve_model
from sparcom.extraction.store import StoreError, open_store

from references import llama_hooked_modules, naive_store


@pytest.mark.parametrize("span", ["prompt", "response"])
@pytest.mark.parametrize("max_batch_size,batch_tokens,padding_side", [
    (1, 4096, "right"), (3, 4096, "left"), (64, 4096, "right"), (64, 4096, "left"), (64, 200, "right"),
])
def test_tiny_llama_float64_counts_are_exact(
    tmp_path, tiny_llama_dir, cache_dir, sample_records, span, max_batch_size, batch_tokens, padding_side
):
    loaded = load_model(resolve_model(str(tiny_llama_dir)), cache_dir, dtype="float64", device="cpu")
    settings = ExtractionSettings(span=span, max_batch_size=max_batch_size, batch_tokens=batch_tokens,
                                  padding_side=padding_side, shard_size=5, layer_chunk=2)
    store = open_store(extract_to_store(loaded, sample_records, tmp_path / "s.zarr", settings))
    expected, tokens = naive_store(tiny_llama_dir, torch.float64, sample_records, span)

    np.testing.assert_array_equal(store.token_count.values, tokens)
    np.testing.assert_array_equal(store.act_count.values, expected)
    assert expected.sum() > 0 and (expected < tokens[:, None, None]).any()  # not all-on or all-off


@pytest.mark.slow
def test_default_model_float32_counts_match_within_rounding(tmp_path, cache_dir, sample_records):
    loaded = load_model(resolve_model("default"), cache_dir, dtype="float32", device="cpu")
    settings = ExtractionSettings(max_batch_size=64, padding_side="left", shard_size=8)
    store = open_store(extract_to_store(loaded, sample_records, tmp_path / "s.zarr", settings))
    model_dir = loaded.model.name_or_path
    expected, tokens = naive_store(model_dir, torch.float32, sample_records, "prompt")

    np.testing.assert_array_equal(store.token_count.values, tokens)
    difference = np.abs(store.act_count.values.astype(np.int64) - expected)
    assert difference.max() <= 1
    assert (difference > 0).sum() <= expected.size / 100_000
    assert store.sizes == {"instruction": 12, "layer": 30, "neuron": 1536}


def test_store_follows_spec_and_opens_without_warnings(tmp_path, tiny_llama_dir, cache_dir, sample_records):
    loaded = load_model(resolve_model(str(tiny_llama_dir)), cache_dir, dtype="float32", device="cpu")
    path = extract_to_store(loaded, sample_records, tmp_path / "s.zarr", ExtractionSettings(shard_size=5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store = xr.open_zarr(path)
        assert dict(store.act_count.sizes) == {"instruction": 12, "layer": 3, "neuron": 48}
        assert store.act_count.dtype == np.uint32 and store.token_count.dtype == np.uint32
        assert store.token_count.dims == ("instruction",)
        assert list(store.instruction_id.values) == [r.id for r in sample_records]
        assert list(store.category.values) == [r.category for r in sample_records]
        assert list(store.origin.values) == [r.origin for r in sample_records]
        assert list(store.layer.values) == [0, 1, 2]
    for attribute in ("model", "model_fingerprint", "revision", "dtype", "device", "token_span",
                      "dataset_hash", "sparcom_version"):
        assert attribute in store.attrs
    assert store.attrs["token_span"] == "prompt" and store.attrs["dtype"] == "float32"
    assert store.attrs["hooked_modules"] == llama_hooked_modules(AutoConfig.from_pretrained(tiny_llama_dir))


def test_unfinished_store_is_refused_and_resumes_to_the_same_counts(
    tmp_path, tiny_llama_dir, cache_dir, sample_records
):
    loaded = load_model(resolve_model(str(tiny_llama_dir)), cache_dir, dtype="float64", device="cpu")
    settings = ExtractionSettings(shard_size=4)
    partial = extract_to_store(loaded, sample_records, tmp_path / "a.zarr", settings, shards=[1])
    with pytest.raises(StoreError, match="has not finished"):
        open_store(partial)
    resumed = open_store(extract_to_store(loaded, sample_records, partial, settings))
    whole = open_store(extract_to_store(loaded, sample_records, tmp_path / "b.zarr", settings))
    xr.testing.assert_identical(resumed.drop_attrs(), whole.drop_attrs())


def test_store_of_other_settings_is_not_overwritten(tmp_path, tiny_llama_dir, cache_dir, sample_records):
    loaded = load_model(resolve_model(str(tiny_llama_dir)), cache_dir, dtype="float64", device="cpu")
    path = extract_to_store(loaded, sample_records, tmp_path / "s.zarr", ExtractionSettings())
    with pytest.raises(StoreError, match="other settings"):
        extract_to_store(loaded, sample_records, path, ExtractionSettings(span="response"))
