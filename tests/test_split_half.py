"""Split-half reliability (docs/method.md section 4b) and the one pass over the counts: halves disjoint, balanced,
stratified and seeded; the group and half sums, the halves' sets and Jaccard values and the
specificity gap against NumPy written here; a planted group is specific, the others are not."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr

from sparcom.identification.settings import IdentificationSettings
from sparcom.identification.identify import identify, identify_store, one_pass_sums
from sparcom.identification.report import report_generality
from sparcom.identification.split_half import half_assignment
from sparcom.extraction.store import open_store

from builders import make_store, moe_store, write_store
from references import naive_rule

CATEGORIES = ["CLS", "CODE", "MATH", "QA"]


def labelled(per_group: int, groups=CATEGORIES, seed: int = 0):
    """Shuffled labels with both origins, unevenly: some groups have odd origin strata."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(groups, per_group)
    origins = np.array(["ai" if rng.random() < 0.4 else "human" for _ in labels])
    order = rng.permutation(len(labels))
    return labels[order], origins[order]


def test_halves_are_disjoint_balanced_stratified_and_seeded():
    labels, origins = labelled(9)
    in_a, reason = half_assignment(labels, origins, 5)
    assert reason is None and in_a.shape == (5, len(labels))
    for seed in range(5):
        for group in CATEGORIES:
            members = labels == group
            a, b = members & in_a[seed], members & ~in_a[seed]
            assert not (a & b).any() and (a | b).sum() == members.sum()   # disjoint, complete
            assert abs(int(a.sum()) - int(b.sum())) <= 1                   # balanced
            for origin in ("ai", "human"):                                 # stratified
                stratum = members & (origins == origin)
                assert abs(int((stratum & a).sum()) - int((stratum & b).sum())) <= 1
    again, _ = half_assignment(labels, origins, 5)
    np.testing.assert_array_equal(in_a, again)                             # seeded
    assert len({tuple(row) for row in in_a}) == 5                          # seeds differ
    np.testing.assert_array_equal(half_assignment(labels, origins, 2)[0], in_a[:2])


def test_groups_too_small_to_split_are_left_out_with_a_reason():
    labels = np.array(["a", "a", "a", "a", "b", "b"])
    in_a, reason = half_assignment(labels, None, 5)
    assert in_a is None and "fewer than 4 instructions" in reason and "'b': 2" in reason
    assert "switched off" in half_assignment(labels, None, 0)[1]


def test_one_pass_sums_equal_numpy_sums(tmp_path):
    categories = [CATEGORIES[k % 4] for k in range(22)]
    store = moe_store(3, categories)
    labels = np.array(categories)
    in_a, _ = half_assignment(labels, np.array(store.origin.values, dtype=str), 3)
    lazy = open_store(write_store(store, tmp_path / "s.zarr"))
    sums = one_pass_sums(lazy, labels, in_a)
    tokens = store.token_count.values.astype(np.int64)
    for name in ("act_count", "expert_count", "expert_act_count", "shared_act_count"):
        counts = store[name].values.astype(np.int64)
        for k, group in enumerate(sorted(CATEGORIES)):
            rows = labels == group
            np.testing.assert_array_equal(sums[name].sel(group=group).values, counts[rows].sum(0))
            assert int(sums.token_total.sel(group=group)) == tokens[rows].sum()
            for seed in range(3):
                half = rows & in_a[seed]
                np.testing.assert_array_equal(sums[f"{name}_half_a"].isel(split_seed=seed, group=k).values,
                                              counts[half].sum(0))
                assert int(sums.half_tokens.isel(split_seed=seed, group=k)) == tokens[half].sum()


def naive_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return (a & b).sum() / union if union else math.nan


@pytest.mark.parametrize("rule", ["global_percentile", "lape", "contrastive"])
def test_split_jaccard_and_gap_equal_numpy(tmp_path, rule):
    """The halves' sets from sums of the halves' own counts, selected by the reference rule."""
    rng = np.random.default_rng(5)
    labels, origins = labelled(8, seed=1)
    tokens = rng.integers(10, 40, len(labels))
    counts = rng.integers(0, 12, (len(labels), 3, 20)).clip(max=tokens[:, None, None])
    store = make_store(counts, tokens, labels.tolist()).assign_coords(origin=("instruction", origins))
    settings = IdentificationSettings(rule=rule, epsilon=0.1, top_rate=0.1, filter_rate=0.8, bar_ratio=0.8,
                                      split_half_seeds=3)
    path = identify_store(write_store(store, tmp_path / "s.zarr"), settings, tmp_path / "out")
    components = xr.open_zarr(path).load()
    in_a, _ = half_assignment(labels, origins, 3)
    groups = sorted(CATEGORIES)
    parameters = dict(epsilon=0.1, top_rate=0.1, filter_rate=0.8, bar_ratio=0.8)
    expected = np.zeros((3, 4, 4))
    for seed in range(3):
        halves = []
        for half in (in_a[seed], ~in_a[seed]):
            p = np.stack([counts[(labels == g) & half].sum(0) / tokens[(labels == g) & half].sum() for g in groups])
            halves.append(naive_rule(p, rule, **parameters))
        for i in range(4):
            for j in range(4):
                expected[seed, i, j] = naive_jaccard(halves[0][i], halves[1][j])
    got = components.neurons_split_jaccard.transpose("split_seed", "group", "other_group").values
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-15)

    summary = report_generality(path, tmp_path / "out")
    generality = xr.open_zarr(tmp_path / "out" / "generality.zarr").load()
    for i, group in enumerate(groups):
        within = np.nanmean(expected[:, i, i])
        cross = np.nanmean([np.nanmean(expected[:, i, j]) for j in range(4) if j != i])
        assert float(generality.neurons_split_within.sel(group=group)) == pytest.approx(within)
        assert float(generality.neurons_specificity_gap.sel(group=group)) == pytest.approx(within - cross)
        assert summary["families"]["neurons"]["split_half"][group]["gap"] == pytest.approx(within - cross, abs=1e-4)
        assert math.isnan(float(generality.neurons_split_cross.sel(group=group, other_group=group)))
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Is this set reproducible from other instructions of its group?" in report
    assert "| group | within | cross | gap | null q95 | p | reproducible |" in report
    assert (tmp_path / "out" / "split_half.png").is_file()


def planted_store(seed: int = 0, per_group: int = 12) -> xr.Dataset:
    """Six groups with the same activity rate per component (4 layers x 100 neurons), except that
    CODE's instructions all fire 10 planted neurons that the others almost never fire."""
    rng = np.random.default_rng(seed)
    groups = ["CLS", "CODE", "GEN", "MATH", "QA", "SUM"]
    labels = np.repeat(groups, per_group)
    tokens = rng.integers(40, 60, len(labels))
    rates = rng.beta(0.5, 3.0, (4, 100))
    planted = np.zeros(rates.shape, bool)
    planted.ravel()[rng.choice(rates.size, 10, replace=False)] = True
    rates[planted] = 0.01
    per_instruction = np.broadcast_to(rates, (len(labels), *rates.shape)).copy()
    per_instruction[labels == "CODE"] = np.where(planted, 0.8, rates)
    return make_store(rng.binomial(tokens[:, None, None], per_instruction), tokens, labels.tolist())


@pytest.mark.parametrize("rule", ["global_percentile", "lape", "contrastive"])
def test_a_planted_group_is_specific_and_the_others_are_not(tmp_path, rule):
    store = planted_store()
    settings = IdentificationSettings(rule=rule, epsilon=0.05, top_rate=0.05, filter_rate=0.9, bar_ratio=0.9)
    path = identify_store(write_store(store, tmp_path / "s.zarr", 12), settings, tmp_path / "out")
    report_generality(path, tmp_path / "out")
    gap = xr.open_zarr(tmp_path / "out" / "generality.zarr").neurons_specificity_gap.load()
    assert float(gap.sel(group="CODE")) > 0.3
    # The others are alike: their gaps are near 0, slightly positive because CODE's half is
    # one of the five cross-group comparisons (measured: at most 0.18 on this store).
    assert np.abs(np.nan_to_num(gap.drop_sel(group="CODE").values)).max() < 0.2


def test_identification_by_instruction_says_why_there_are_no_halves():
    store = planted_store(per_group=4)
    result = identify(store, IdentificationSettings(group_by="instruction"))
    assert "one instruction per group" in result.attrs["split_half_left_out"]
    assert not [name for name in result.data_vars if "split" in name]
