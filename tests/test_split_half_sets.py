"""The split halves' sets of the rules that rank within a group, selected from summed counts
(docs/method.md section 4b), and the Jaccard values of in-memory and lazy sets: against NumPy
written here, on constructed stores with ties, padding and halves without tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr

from sparcom.identification.settings import IdentificationSettings
from sparcom.identification.identify import identify, one_pass_sums
from sparcom.identification.split_half import cross_jaccard, half_assignment
from sparcom.extraction.store import StoreError, open_store

from builders import make_store, write_store
from references import assert_moe_store_report_matches_set_arithmetic, naive_rule


def naive_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return (a & b).sum() / union if union else math.nan


def naive_split_jaccard(counts, tokens, labels, in_a, rule, epsilon) -> np.ndarray:
    """J(g_A, h_B)[seed, g, h], each half's frequencies from its own instructions (0 without tokens)."""
    groups = sorted(set(labels.tolist()))
    expected = np.zeros((len(in_a), len(groups), len(groups)))
    for seed, half_a in enumerate(in_a):
        halves = []
        for half in (half_a, ~half_a):
            p = []
            for g in groups:
                rows = (labels == g) & half
                total = tokens[rows].sum()
                p.append(counts[rows].sum(0) / total if total else np.zeros(counts.shape[1:]))
            halves.append(naive_rule(np.stack(p), rule, epsilon=epsilon))
        for i in range(len(groups)):
            for j in range(len(groups)):
                expected[seed, i, j] = naive_jaccard(halves[0][i], halves[1][j])
    return expected


@pytest.mark.parametrize("rule", ["global_percentile", "layer_percentile"])
def test_rank_rules_give_each_half_the_sets_of_its_frequencies(rule):
    """Coarse counts (many ties at the thresholds), 3 x 23 components (not a whole number of
    64-bit words), and a group whose half A saw no tokens: its frequencies are 0 there."""
    rng = np.random.default_rng(8)
    labels = np.array(["CLS"] * 6 + ["QA"] * 6 + ["SUM"] * 4)
    # SUM's four instructions are each their own origin stratum, so every seed deals "a" and
    # "c" to half A: without tokens, although they counted (an inconsistent store).
    origins = np.array(["ai", "human"] * 6 + ["a", "b", "c", "d"])
    tokens = rng.integers(20, 40, len(labels))
    counts = rng.integers(0, 4, (len(labels), 3, 23)).clip(max=tokens[:, None, None])
    tokens[[12, 14]] = 0
    counts[[12, 14]] = 1
    store = make_store(counts, tokens, labels.tolist()).assign_coords(origin=("instruction", origins))
    result = identify(store, IdentificationSettings(rule=rule, epsilon=0.1, split_half_seeds=3))
    in_a, _ = half_assignment(labels, origins, 3)
    assert in_a[:, 12].all() and in_a[:, 14].all()  # the half without tokens is A
    expected = naive_split_jaccard(counts, tokens, labels, in_a, rule, 0.1)
    got = result.neurons_split_jaccard.transpose("split_seed", "group", "other_group").values
    np.testing.assert_array_equal(got, expected)


def test_a_half_with_more_activations_than_tokens_is_refused():
    labels = np.array(["CLS"] * 4 + ["QA"] * 4)
    origins = np.array(["a", "b", "c", "d"] * 2)
    tokens = np.full(8, 10)
    counts = np.ones((8, 2, 5), dtype=np.int64)
    tokens[0], counts[0] = 0, 5  # CLS's half A: 5 + 1 activations on 10 tokens per component...
    counts[2] = 6                # ...then 5 + 6 on 10: above one, though the group's 14 on 30 is not
    store = make_store(counts, tokens, labels.tolist()).assign_coords(origin=("instruction", origins))
    with pytest.raises(StoreError, match=r"frequencies outside \[0, 1\] \(from 0\.1 to 1\.1\)"):
        identify(store, IdentificationSettings(split_half_seeds=1))


@pytest.mark.parametrize("chunked", [False, True])
def test_cross_jaccard_of_sets_equals_set_arithmetic(chunked):
    rng = np.random.default_rng(4)
    a = rng.random((3, 4, 33)) < 0.3
    b = rng.random((5, 4, 33)) < 0.5
    b[4] = False                      # an empty set
    a[2] = False                      # empty too: J(a_2, b_4) is undefined
    sets_a = xr.DataArray(a, dims=("group", "layer", "neuron"), coords={"group": ["x", "y", "z"]})
    sets_b = xr.DataArray(b, dims=("group", "layer", "neuron"), coords={"group": list("pqrst")})
    if chunked:
        sets_a, sets_b = sets_a.chunk({"layer": 2}), sets_b.chunk({"neuron": 10})
    got = cross_jaccard(sets_a, sets_b.transpose("neuron", "group", "layer"), ["layer", "neuron"]).compute()
    assert got.dims == ("group", "other_group")
    assert got.group.values.tolist() == ["x", "y", "z"] and got.other_group.values.tolist() == list("pqrst")
    expected = np.array([[naive_jaccard(a[i], b[j]) for j in range(5)] for i in range(3)])
    np.testing.assert_array_equal(got.values, expected)
    assert math.isnan(float(got.sel(group="z", other_group="t")))


def test_lazy_analysis_of_sets_too_large_for_memory(tmp_path, monkeypatch):
    """Sets above IN_MEMORY_BYTES are analysed chunk by chunk: the same report, against set
    arithmetic (test_identify.py runs the same check in memory, at the default size)."""
    import sparcom.identification.generality

    monkeypatch.setattr(sparcom.identification.generality, "IN_MEMORY_BYTES", 0)
    assert_moe_store_report_matches_set_arithmetic(tmp_path)


def test_group_sums_above_16_bits_stay_exact(tmp_path):
    """Sums leave the workers as integers of the width their tokens need: 32 bits here."""
    rng = np.random.default_rng(2)
    labels = np.repeat(["CLS", "QA"], 6)
    tokens = rng.integers(20000, 40000, len(labels))
    counts = (rng.random((len(labels), 3, 10)) * tokens[:, None, None]).astype(np.int64)
    store = make_store(counts, tokens, labels.tolist())
    in_a, _ = half_assignment(labels, np.array(store.origin.values, dtype=str), 2)
    sums = one_pass_sums(open_store(write_store(store, tmp_path / "s.zarr")), labels, in_a)
    assert sums.act_count.dtype == np.uint32
    for k, group in enumerate(["CLS", "QA"]):
        rows = labels == group
        np.testing.assert_array_equal(sums.act_count.sel(group=group).values, counts[rows].sum(0))
        for seed in range(2):
            np.testing.assert_array_equal(sums.act_count_half_a.isel(split_seed=seed, group=k).values,
                                          counts[rows & in_a[seed]].sum(0))
    frequency = identify(store, IdentificationSettings(split_half_seeds=2)).frequency
    for group in ("CLS", "QA"):
        rows = labels == group
        np.testing.assert_array_equal(frequency.sel(group=group).values, counts[rows].sum(0) / tokens[rows].sum())


def test_one_pass_sums_over_many_runs_tiles_and_sum_levels(tmp_path, monkeypatch):
    """Runs of two chunks, a tree of adds three levels deep, tiles of 7 columns (the last one
    shorter) and runs in which some groups have no instruction (labels in blocks): the sums of
    every group and half against NumPy; and no chunk of the store is read outside a product."""
    import sparcom.identification.identify

    rng = np.random.default_rng(4)
    labels = np.repeat(["CLS", "CODE", "QA"], [9, 6, 9])  # chunks of 3: a run holds one or two groups
    tokens = rng.integers(20, 60, len(labels))
    counts = (rng.random((len(labels), 3, 17)) * tokens[:, None, None]).astype(np.int64)
    made = make_store(counts, tokens, labels.tolist())
    store = open_store(write_store(made, tmp_path / "s.zarr"))
    chunk_bytes = store.act_count.data.dtype.itemsize * 3 * 17  # 3 instructions x 1 layer x 17
    monkeypatch.setattr(sparcom.identification.identify, "CONTRACTION_BLOCK_BYTES", 2 * chunk_bytes)
    monkeypatch.setattr(sparcom.identification.identify, "SUM_FAN_IN", 2)
    monkeypatch.setattr(sparcom.identification.identify, "TILE_BYTES", 7 * 6 * 4)  # 6 rows of float32 in a run
    in_a, _ = half_assignment(labels, np.array(made.origin.values, dtype=str), 2)

    lazy = sparcom.identification.identify._contract(store.act_count, np.searchsorted(["CLS", "CODE", "QA"], labels), 3,
                                      np.ones((len(labels), 1), dtype=np.float32), np.uint32)
    store_chunks = store.act_count.data.name
    assert not [key for key in dict(lazy.data.__dask_graph__()) if key[0] == store_chunks]

    sums = one_pass_sums(store, labels, in_a)
    for k, group in enumerate(["CLS", "CODE", "QA"]):
        rows = labels == group
        np.testing.assert_array_equal(sums.act_count.sel(group=group).values, counts[rows].sum(0))
        for seed in range(2):
            np.testing.assert_array_equal(sums.act_count_half_a.isel(split_seed=seed, group=k).values,
                                          counts[rows & in_a[seed]].sum(0))
            assert int(sums.half_tokens.isel(split_seed=seed, group=k)) == tokens[rows & in_a[seed]].sum()
