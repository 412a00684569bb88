"""Selection rules, stored components and generality analysis against plain NumPy, on constructed
dense and MoE stores written to Zarr in the store contract's layout (several chunks per dim); the
NumPy and set-arithmetic references are in tests/references.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr

from sparcom.identification.settings import IdentificationSettings
from sparcom.identification.generality import analyze, generality
from sparcom.identification.identify import group_frequencies, identify, identify_store
from sparcom.identification.rules import select, top_fraction_threshold

from builders import CATEGORIES, make_store, moe_store, write_store
from references import (
    assert_components_match, assert_moe_store_report_matches_set_arithmetic, naive_generality, naive_global_selection,
)

RULES = ("global_percentile", "layer_percentile", "threshold")


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture
def random_store():
    rng = np.random.default_rng(7)
    categories = ["CLS", "MATH", "QA", "CLS", "MATH", "QA", "CLS", "SUM"]
    tokens = rng.integers(5, 40, size=len(categories))
    counts = rng.integers(0, 6, size=(len(categories), 4, 25)).clip(max=tokens[:, None, None])
    return make_store(counts, tokens, categories)


# --- rules on in-memory arrays -----------------------------------------------------------------

def test_group_frequencies_are_summed_counts_over_summed_tokens(random_store):
    frequencies = group_frequencies(random_store, "category").frequency
    for category in ["CLS", "MATH", "QA", "SUM"]:
        rows = random_store.category.values == category
        expected = random_store.act_count.values[rows].sum(0) / random_store.token_count.values[rows].sum()
        np.testing.assert_array_equal(frequencies.sel(group=category).values, expected)


@pytest.mark.parametrize("epsilon", [0.01, 0.05, 0.1, 0.33, 1.0])
def test_global_percentile_matches_naive_sort(random_store, epsilon):
    frequencies = group_frequencies(random_store, "category").frequency
    selected = select(frequencies, "global_percentile", epsilon=epsilon).selected
    for category in frequencies.group.values:
        f = frequencies.sel(group=category).transpose("layer", "neuron").values
        np.testing.assert_array_equal(selected.sel(group=category).transpose("layer", "neuron").values,
                                      naive_global_selection(f, epsilon))


def test_ties_at_the_threshold_are_all_kept():
    values = np.array([0.9, 0.5, 0.5, 0.5, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0])
    frequency = xr.DataArray(values.reshape(1, 2, 5), dims=("group", "layer", "neuron"))
    chosen = select(frequency, "global_percentile", epsilon=0.2)  # m = 2: threshold 0.5
    assert int(chosen.selected.sum()) == 4 and chosen.threshold.values.tolist() == [0.5]


def test_epsilon_tolerance_absorbs_float_error():
    # 0.07 * 100 = 7.000000000000001 in floating point: m must be 7, not 8.
    assert top_fraction_threshold(np.arange(100.0), 0.07) == 93.0
    assert top_fraction_threshold(np.arange(100.0), 0.001) == 99.0  # m is at least 1


def test_all_zero_group_selects_nothing():
    counts = np.zeros((2, 2, 3))
    counts[0] = 1
    store = make_store(counts, np.array([4, 4]), ["CLS", "QA"])
    for rule in RULES:
        result = identify(store, IdentificationSettings(rule=rule, epsilon=0.5, tau=0.1))
        assert int(result.isn.sel(group="QA").sum()) == 0
        assert int(result.isn.sel(group="CLS").sum()) == 6


def test_layer_percentile_and_threshold_rules(random_store):
    frequencies = group_frequencies(random_store, "category").frequency
    per_layer = select(frequencies, "layer_percentile", epsilon=0.1)
    for category in frequencies.group.values:
        for layer in frequencies.layer.values:
            f = frequencies.sel(group=category, layer=layer).values
            np.testing.assert_array_equal(per_layer.selected.sel(group=category, layer=layer).values,
                                          naive_global_selection(f, 0.1))
    assert per_layer.threshold.dims == ("group", "layer")
    fixed = select(frequencies, "threshold", tau=0.1)
    np.testing.assert_array_equal(fixed.selected.values, frequencies.values >= 0.1)
    assert (fixed.threshold == 0.1).all() and fixed.threshold.dims == ("group",)


def test_grouping_by_origin_and_instruction(random_store):
    by_origin = identify(random_store, IdentificationSettings(group_by="origin"))
    assert sorted(by_origin.group.values.tolist()) == ["ai", "human"]
    by_instruction = identify(random_store, IdentificationSettings(group_by="instruction"))
    first = by_instruction.frequency.sel(group="i0").values
    np.testing.assert_array_equal(first, random_store.act_count.values[0] / random_store.token_count.values[0])
    assert by_instruction.attrs["group_by"] == "instruction"
    assert by_instruction.category.values.tolist() == random_store.category.values.tolist()


def test_bad_input_is_named(random_store):
    with pytest.raises(ValueError, match="unknown selection rule 'top_k'"):
        select(group_frequencies(random_store).frequency, "top_k")
    with pytest.raises(ValueError, match="no 'language' coordinate"):
        group_frequencies(random_store, "language")
    with pytest.raises(ValueError, match="no count variable"):
        identify(random_store.drop_vars("act_count"), IdentificationSettings())
    repeated = random_store.assign_coords(instruction_id=("instruction", ["same"] * 8))
    with pytest.raises(ValueError, match="instruction_id values repeat"):
        group_frequencies(repeated, "instruction")


# --- the stage on Zarr stores (lazy, chunked) ----------------------------------------------------

@pytest.mark.parametrize("group_by", ["category", "origin", "instruction"])
@pytest.mark.parametrize("rule", RULES)
def test_identify_store_matches_numpy_on_a_chunked_moe_store(tmp_path, rule, group_by):
    store = moe_store(11, CATEGORIES)
    settings = IdentificationSettings(rule=rule, epsilon=0.07, tau=0.2, group_by=group_by)
    path = identify_store(write_store(store, tmp_path / "s.zarr"), settings, tmp_path / "out")
    components = xr.open_zarr(path).load()
    assert_components_match(components, store, settings)
    assert {k: components.attrs[k] for k in ("rule", "epsilon", "tau", "group_by", "model", "dataset_hash")} == {
        "rule": rule, "epsilon": 0.07, "tau": 0.2, "group_by": group_by, "model": "tiny-test", "dataset_hash": "d" * 64}
    assert components.ise.dims == ("group", "moe_layer", "expert")
    assert components.moe_layer.values.tolist() == [2, 3, 4]  # the true layer indices


def test_pure_moe_store_and_dense_store(tmp_path):
    pure = moe_store(5, CATEGORIES, dense_layers=0)
    settings = IdentificationSettings(epsilon=0.1)
    components = xr.open_zarr(identify_store(write_store(pure, tmp_path / "moe.zarr"), settings, tmp_path / "a")).load()
    assert "isn" not in components and "frequency" not in components
    assert_components_match(components, pure, settings)

    rng = np.random.default_rng(2)
    tokens = rng.integers(3, 20, len(CATEGORIES))
    dense = make_store(rng.integers(0, 4, (len(CATEGORIES), 5, 16)).clip(max=tokens[:, None, None]), tokens, CATEGORIES)
    components = xr.open_zarr(identify_store(write_store(dense, tmp_path / "d.zarr", 2), settings, tmp_path / "b")).load()
    assert set(components.data_vars) == {"token_total", "frequency", "isn", "threshold"}
    assert_components_match(components, dense, settings)


def test_ties_and_empty_groups_through_the_store(tmp_path):
    """Constructed counts: CLS has a four-way tie at its threshold, QA's instructions saw no
    tokens, SUM's saw tokens but never activated anything."""
    counts = np.zeros((5, 2, 5), dtype=np.uint32)
    counts[0, 0] = [9, 5, 5, 0, 0]
    counts[0, 1] = [5, 5, 1, 0, 0]
    counts[1] = 3  # CLS again: adds 3 everywhere, keeps the tie
    tokens = np.array([10, 10, 0, 0, 7])
    store = make_store(counts, tokens, ["CLS", "CLS", "QA", "QA", "SUM"])
    path = identify_store(write_store(store, tmp_path / "s.zarr", 2), IdentificationSettings(epsilon=0.2),
                          tmp_path / "out")
    components = xr.open_zarr(path).load()
    cls = components.isn.sel(group="CLS").values
    assert cls.sum() == 5 and float(components.threshold.sel(group="CLS")) == 8 / 20  # m = 2, four ties
    assert int(components.token_total.sel(group="QA")) == 0
    assert not components.isn.sel(group=["QA", "SUM"]).any()
    assert (components.frequency.sel(group="QA") == 0).all()


# --- generality ----------------------------------------------------------------------------------

def test_generality_matches_set_arithmetic():
    rng = np.random.default_rng(3)
    groups = ["CLS", "CODE", "QA", "EMPTY"]
    sets = rng.random((4, 3, 10)) < 0.4
    sets[:3, 0, :4] = True  # four neurons shared by the three non-empty groups...
    sets[3] = False          # ...but the empty group makes "general" empty
    isn = xr.DataArray(sets, dims=("group", "layer", "neuron"), coords={"group": groups})
    result = generality(isn)

    assert int(result.general_count) == 0
    as_python = {g: {tuple(ix) for ix in np.argwhere(sets[k])} for k, g in enumerate(groups)}
    naive = naive_generality(as_python)
    for g in groups:
        assert int(result.unique_count.sel(group=g)) == len(naive["unique"][g])
        assert int(result.set_size.sel(group=g)) == len(as_python[g])
        for h in groups:
            value = float(result.jaccard.sel(group=g, other_group=h))
            if naive["jaccard"][g, h] is None:
                assert math.isnan(value)
            else:
                assert value == pytest.approx(naive["jaccard"][g, h])
    np.testing.assert_array_equal(result.set_size_per_layer.values, sets.sum(2))
    np.testing.assert_array_equal(result.membership.values, sets.sum(0))
    assert result.membership.dtype == np.uint8  # the smallest type that holds 4 groups

    general = generality(isn.sel(group=groups[:3]))
    assert int(general.general_count) == int(np.logical_and.reduce(sets[:3]).sum()) >= 4
    np.testing.assert_allclose(general.layer_distribution.sum("layer").values, 1.0)


def test_report_of_a_moe_store_matches_set_arithmetic(tmp_path):
    assert_moe_store_report_matches_set_arithmetic(tmp_path)


def test_analysis_leaves_out_an_unaffordable_jaccard_matrix(monkeypatch):
    import sparcom.identification.generality

    monkeypatch.setattr(sparcom.identification.generality, "JACCARD_MAX_WORK", 10)
    isn = xr.DataArray(np.ones((3, 2, 2), bool), dims=("group", "layer", "neuron"),
                       coords={"group": ["a", "b", "c"]})
    result = analyze(xr.Dataset({"isn": isn}))
    assert "neurons_jaccard" not in result and "3 groups" in result.attrs["neurons_jaccard_left_out"]
    assert int(result.neurons_general_count) == 4
