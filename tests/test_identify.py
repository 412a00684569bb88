"""Selection rules and generality analysis against plain NumPy on constructed stores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr

from sparcom.analysis import generality
from sparcom.config import IdentificationSettings
from sparcom.identify import group_frequencies, identify, select, top_fraction_threshold


def make_store(act_count: np.ndarray, token_count: np.ndarray, categories: list[str]) -> xr.Dataset:
    n = len(categories)
    return xr.Dataset(
        {"act_count": (("instruction", "layer", "neuron"), act_count.astype(np.uint32)),
         "token_count": (("instruction",), token_count.astype(np.uint32))},
        coords={"instruction_id": ("instruction", [f"i{k}" for k in range(n)]),
                "category": ("instruction", categories),
                "origin": ("instruction", ["ai", "human"] * (n // 2) + ["ai"] * (n % 2)),
                "layer": np.arange(act_count.shape[1])})


def naive_global_selection(frequency: np.ndarray, epsilon: float) -> np.ndarray:
    """Sort descending, take the m-th value, keep everything at or above it."""
    flat = sorted(frequency.ravel().tolist(), reverse=True)
    if flat[0] == 0:
        return np.zeros_like(frequency, dtype=bool)
    m = max(1, math.ceil(epsilon * len(flat) - 1e-9))
    return frequency >= flat[m - 1]


@pytest.fixture
def random_store():
    rng = np.random.default_rng(7)
    categories = ["CLS", "MATH", "QA", "CLS", "MATH", "QA", "CLS", "SUM"]
    tokens = rng.integers(5, 40, size=len(categories))
    counts = rng.integers(0, 6, size=(len(categories), 4, 25)).clip(max=tokens[:, None, None])
    return make_store(counts, tokens, categories)


def test_group_frequencies_are_summed_counts_over_summed_tokens(random_store):
    frequencies = group_frequencies(random_store, "category").frequency
    for category in ["CLS", "MATH", "QA", "SUM"]:
        rows = random_store.category.values == category
        expected = random_store.act_count.values[rows].sum(0) / random_store.token_count.values[rows].sum()
        np.testing.assert_array_equal(frequencies.sel(group=category).values, expected)


@pytest.mark.parametrize("epsilon", [0.01, 0.05, 0.1, 0.33, 1.0])
def test_global_percentile_matches_naive_sort(random_store, epsilon):
    frequencies = group_frequencies(random_store, "category").frequency
    isn = select(frequencies, "global_percentile", epsilon=epsilon).isn
    for category in frequencies.group.values:
        f = frequencies.sel(group=category).transpose("layer", "neuron").values
        np.testing.assert_array_equal(isn.sel(group=category).transpose("layer", "neuron").values,
                                      naive_global_selection(f, epsilon))


def test_ties_at_the_threshold_are_all_kept():
    values = np.array([0.9, 0.5, 0.5, 0.5, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0])
    frequency = xr.DataArray(values.reshape(1, 2, 5), dims=("group", "layer", "neuron"))
    isn = select(frequency, "global_percentile", epsilon=0.2).isn  # m = 2: threshold 0.5
    assert int(isn.sum()) == 4


def test_epsilon_tolerance_absorbs_float_error():
    # 0.07 * 100 = 7.000000000000001 in floating point: m must be 7, not 8.
    assert top_fraction_threshold(np.arange(100.0), 0.07) == 93.0


def test_all_zero_group_selects_nothing():
    counts = np.zeros((2, 2, 3))
    counts[0] = 1
    store = make_store(counts, np.array([4, 4]), ["CLS", "QA"])
    for rule in ("global_percentile", "layer_percentile", "threshold"):
        result = identify(store, IdentificationSettings(rule=rule, epsilon=0.5, tau=0.1))
        assert int(result.isn.sel(group="QA").sum()) == 0
        assert int(result.isn.sel(group="CLS").sum()) == 6


def test_layer_percentile_and_threshold_rules(random_store):
    frequencies = group_frequencies(random_store, "category").frequency
    per_layer = select(frequencies, "layer_percentile", epsilon=0.1).isn
    for category in frequencies.group.values:
        for layer in frequencies.layer.values:
            f = frequencies.sel(group=category, layer=layer).values
            np.testing.assert_array_equal(per_layer.sel(group=category, layer=layer).values,
                                          naive_global_selection(f, 0.1))
    fixed = select(frequencies, "threshold", tau=0.1).isn
    np.testing.assert_array_equal(fixed.values, frequencies.values >= 0.1)


def test_grouping_by_origin_and_instruction(random_store):
    by_origin = identify(random_store, IdentificationSettings(group_by="origin"))
    assert sorted(by_origin.group.values.tolist()) == ["ai", "human"]
    by_instruction = identify(random_store, IdentificationSettings(group_by="instruction"))
    first = by_instruction.frequency.sel(group="i0").values
    np.testing.assert_array_equal(first, random_store.act_count.values[0] / random_store.token_count.values[0])
    assert by_instruction.attrs["group_by"] == "instruction"


def test_generality_matches_set_arithmetic():
    rng = np.random.default_rng(3)
    groups = ["CLS", "CODE", "QA", "EMPTY"]
    sets = rng.random((4, 3, 10)) < 0.4
    sets[:3, 0, :4] = True  # four neurons shared by the three non-empty groups...
    sets[3] = False          # ...but the empty group makes "general" empty
    isn = xr.DataArray(sets, dims=("group", "layer", "neuron"), coords={"group": groups})
    result = generality(isn)

    assert int(result.general_count) == 0
    sets_as_python = {g: {tuple(ix) for ix in np.argwhere(sets[k])} for k, g in enumerate(groups)}
    for g in groups:
        others = set().union(*(sets_as_python[o] for o in groups if o != g))
        assert int(result.unique_count.sel(group=g)) == len(sets_as_python[g] - others)
        assert int(result.set_size.sel(group=g)) == len(sets_as_python[g])
        for h in groups:
            union = sets_as_python[g] | sets_as_python[h]
            value = float(result.jaccard.sel(group=g, other_group=h))
            if union:
                assert value == pytest.approx(len(sets_as_python[g] & sets_as_python[h]) / len(union))
            else:
                assert math.isnan(value)
    np.testing.assert_array_equal(result.set_size_per_layer.values, sets.sum(2))

    general = generality(isn.sel(group=groups[:3]))
    assert int(general.general_count) == int(np.logical_and.reduce(sets[:3]).sum()) >= 4
    np.testing.assert_allclose(general.layer_distribution.sum("layer").values, 1.0)
