"""The attribution rules (docs/method.md section 6a) against NumPy written from the definitions:
each group's mean estimate (a float64 sum over its records divided by their number), the exact m
rule of section 2 with ties at the threshold, nothing negative or zero selected (an all-negative
group selects nothing), the margin over the best other group; the same on Dask from written
stores, the split halves' means and sets, and `sparcom identify --attribution`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr
from typer.testing import CliRunner

from cli.app import app
from sparcom.identification.identify import identify, identify_rules, identify_store, open_attribution
from sparcom.identification.keys import identification_key
from sparcom.identification.schema import FAMILIES
from sparcom.identification.settings import IdentificationSettings
from sparcom.identification.split_half import half_assignment, label_permutations

from builders import attribution_store, make_store, moe_store, write_store

RULES = ("attribution", "attribution_contrastive")
CATEGORIES = ["CLS", "CODE", "MATH", "QA"] * 4


def naive_top(values: np.ndarray, epsilon: float) -> np.ndarray:
    """Sort all N values descending, m = ceil(eps * N - 1e-9) (at least 1), keep >= the m-th and > 0."""
    ordered = sorted(values.ravel().tolist(), reverse=True)
    m = max(1, math.ceil(epsilon * len(ordered) - 1e-9))
    return (values >= ordered[m - 1]) & (values > 0)


def naive_attribution_sets(means: np.ndarray, rule: str, epsilon: float) -> np.ndarray:
    """means[group, ...] -> selected[group, ...]."""
    sets = np.zeros(means.shape, dtype=bool)
    for g in range(len(means)):
        values = means[g]
        if rule == "attribution_contrastive":
            values = values - np.max(np.delete(means, g, axis=0), axis=0)
        sets[g] = naive_top(values, epsilon)
    return sets


def naive_means(estimates: np.ndarray, labels: np.ndarray, members: np.ndarray | None = None) -> np.ndarray:
    """Per sorted group: sum of its (chosen) records' estimates in float64, record by record, / count."""
    members = np.ones(len(labels), dtype=bool) if members is None else members
    means = []
    for group in sorted(set(labels.tolist())):
        rows = np.flatnonzero((labels == group) & members)
        total = np.zeros(estimates.shape[1:], dtype=np.float64)
        for row in rows:
            total += estimates[row].astype(np.float64)
        means.append(total / len(rows))
    return np.stack(means)


def naive_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return (a & b).sum() / union if union else float("nan")


# --- the rules on constructed means ------------------------------------------------------------------------

def one_layer(estimates: np.ndarray, categories: list[str]) -> tuple[xr.Dataset, xr.Dataset]:
    """A count store (counts of 1 everywhere) and its attribution store from estimates[record, neuron]."""
    counts = np.ones((len(categories), 1, estimates.shape[1]))
    store = make_store(counts, np.full(len(categories), 4), categories)
    attribution = xr.Dataset({"act_attribution": (("instruction", "layer", "neuron"),
                                                  estimates[:, None, :].astype(np.float32))}, coords=store.coords)
    return store, attribution


def test_ties_negative_values_and_the_exact_m_rule():
    # Two records per group; means: CLS [3, 2, 2, 2, 1, -1, 0, 0, -2, 0.5], CODE all negative.
    cls = np.array([3, 2, 2, 2, 1, -1, 0, 0, -2, 0.5])
    code = -np.arange(1, 11, dtype=float)
    estimates = np.stack([cls + 1, cls - 1, code - 0.5, code + 0.5])
    store, attribution = one_layer(estimates, ["CLS", "CLS", "CODE", "CODE"])
    # epsilon 0.2 of N = 10: m = 2, threshold 2, a three-way tie at it kept
    result = identify(store, IdentificationSettings(rule="attribution", epsilon=0.2), attribution)
    assert result.attribution_mean.sel(group="CLS").values.ravel().tolist() == cls.tolist()
    assert np.flatnonzero(result.isn.sel(group="CLS").values.ravel()).tolist() == [0, 1, 2, 3]
    assert not result.isn.sel(group="CODE").any()  # every estimate negative: nothing
    # 0.3 * 10 = 3.0000000000000004: m = 3 (not 4), the threshold is still the tie at 2
    assert float(identify(store, IdentificationSettings(rule="attribution", epsilon=0.3), attribution)
                 .threshold.sel(group="CLS")) == 2.0
    # epsilon 0.7: m = 7 reaches the zeros and negatives; only the six positive means are kept
    wide = identify(store, IdentificationSettings(rule="attribution", epsilon=0.7), attribution)
    assert np.flatnonzero(wide.isn.sel(group="CLS").values.ravel()).tolist() == [0, 1, 2, 3, 4, 9]
    # margins: CLS over CODE all positive (CODE below), CODE over CLS all negative -> nothing
    contrastive = identify(store, IdentificationSettings(rule="attribution_contrastive", epsilon=0.2), attribution)
    margins = cls - code
    assert contrastive.isn.sel(group="CLS").values.ravel().tolist() == naive_top(margins, 0.2).tolist()
    assert not contrastive.isn.sel(group="CODE").any()
    # the frequencies stay beside the estimates' means (the frequency-matched control reads them)
    assert (contrastive.frequency == 0.25).all() and contrastive.record_total.values.tolist() == [2, 2]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("seed", [0, 1])
def test_every_family_against_numpy_with_split_halves(rule, seed):
    store = moe_store(seed, CATEGORIES)
    attribution = attribution_store(store, seed)
    settings = IdentificationSettings(rule=rule, epsilon=0.1, split_half_seeds=2)
    result = identify(store, settings, attribution)
    labels = np.array(CATEGORIES)
    in_half_a, _ = half_assignment(labels, np.array(store.origin.values.tolist()), 2)
    checked = 0
    for family in FAMILIES:
        estimates = attribution[family.attribution].values
        means = naive_means(estimates, labels)
        np.testing.assert_array_equal(result[family.attribution_mean].values, means)
        np.testing.assert_array_equal(result[family.selected].values, naive_attribution_sets(means, rule, 0.1))
        for split in range(2):
            a = naive_attribution_sets(naive_means(estimates, labels, in_half_a[split]), rule, 0.1)
            b = naive_attribution_sets(naive_means(estimates, labels, ~in_half_a[split]), rule, 0.1)
            expected = [[naive_jaccard(a[g], b[h]) for h in range(4)] for g in range(4)]
            np.testing.assert_allclose(result[f"{family.name}_split_jaccard"].isel(split_seed=split).values,
                                       expected, equal_nan=True)
        checked += 1
    assert checked == 4 and result.attrs["attribution_max_response_tokens"] == 16


def naive_gap(estimates: np.ndarray, labels: np.ndarray, origins: np.ndarray, rule: str, seeds: int) -> np.ndarray:
    """Section 4b from the definitions: per seed each half's means and sets, the mean within-group
    Jaccard over seeds minus the mean over other groups of the mean cross-group Jaccard."""
    in_half_a, _ = half_assignment(labels, origins, seeds)
    groups = len(set(labels.tolist()))
    jaccard = np.zeros((seeds, groups, groups))
    for split in range(seeds):
        a = naive_attribution_sets(naive_means(estimates, labels, in_half_a[split]), rule, 0.1)
        b = naive_attribution_sets(naive_means(estimates, labels, ~in_half_a[split]), rule, 0.1)
        jaccard[split] = [[naive_jaccard(a[g], b[h]) for h in range(groups)] for g in range(groups)]
    mean = np.nanmean(jaccard, axis=0)
    return np.array([mean[g, g] - np.nanmean(np.delete(mean[g], g)) for g in range(groups)])


@pytest.mark.parametrize("rule", RULES)
def test_the_split_half_null_of_the_attribution_rules(rule):
    """The null's gaps come from the estimates' halves under shuffled labels, not from the counts'."""
    store = moe_store(9, CATEGORIES)
    attribution = attribution_store(store, 9)
    settings = IdentificationSettings(rule=rule, epsilon=0.1, split_half_seeds=2, split_half_permutations=3)
    result = identify(store, settings, attribution)
    labels, origins = np.array(CATEGORIES), np.array(store.origin.values.tolist())
    for k, shuffled in enumerate(label_permutations(labels, 3)):
        for family in FAMILIES:
            expected = naive_gap(attribution[family.attribution].values, shuffled, origins, rule, 2)
            np.testing.assert_allclose(result[f"{family.name}_split_null_gap"].isel(permutation=k).values, expected,
                                       equal_nan=True, err_msg=f"{family.name} permutation {k}")


def test_attribution_rules_beside_frequency_rules():
    """Several rules in one pass: each rule's result is the one it gives alone, and only the
    attribution rules' results carry the estimates' means."""
    store = moe_store(10, CATEGORIES)
    attribution = attribution_store(store, 10)
    together = identify_rules(store, IdentificationSettings(rules=["contrastive", "attribution"], epsilon=0.1,
                                                            split_half_permutations=2), attribution)
    for rule in ("contrastive", "attribution"):
        alone = identify(store, IdentificationSettings(rule=rule, epsilon=0.1, split_half_permutations=2), attribution)
        xr.testing.assert_identical(together[rule], alone)
    assert "attribution_mean" in together["attribution"] and "attribution_mean" not in together["contrastive"]


def test_grouped_by_instruction_the_means_are_the_estimates():
    store = moe_store(3, CATEGORIES)
    attribution = attribution_store(store, 3)
    result = identify(store, IdentificationSettings(rule="attribution", group_by="instruction", epsilon=0.1),
                      attribution)
    estimates = attribution.expert_act_attribution.values.astype(np.float64)
    np.testing.assert_array_equal(result.expert_neuron_attribution_mean.values, estimates)
    np.testing.assert_array_equal(result.expert_isn.values, naive_attribution_sets(estimates, "attribution", 0.1))


@pytest.mark.parametrize("rule", RULES)
def test_the_stage_on_dask_from_written_stores(tmp_path, rule):
    store = moe_store(5, CATEGORIES)
    attribution = attribution_store(store, 5)
    counts, estimates = write_store(store, tmp_path / "counts.zarr"), write_store(attribution, tmp_path / "attr.zarr")
    settings = IdentificationSettings(rule=rule, epsilon=0.1, attribution=estimates)
    written = xr.open_zarr(identify_store(counts, settings, tmp_path / "run"))
    labels = np.array(CATEGORIES)
    for family in FAMILIES:
        means = naive_means(attribution[family.attribution].values, labels)
        np.testing.assert_array_equal(written[family.attribution_mean].values, means)
        np.testing.assert_array_equal(written[family.selected].values, naive_attribution_sets(means, rule, 0.1))


def test_the_key_follows_the_estimates_not_their_path(tmp_path):
    store = moe_store(6, CATEGORIES)
    counts = write_store(store.assign_attrs(extraction_key="e" * 64), tmp_path / "counts.zarr")
    first = write_store(attribution_store(store, 6).assign_attrs(attribution_key="k1", shard_fillers=["w1"]),
                        tmp_path / "a.zarr")
    moved = write_store(attribution_store(store, 6).assign_attrs(attribution_key="k1", shard_fillers=["w2"]),
                        tmp_path / "b.zarr")
    other = write_store(attribution_store(store, 6).assign_attrs(attribution_key="k2", shard_fillers=["w1"]),
                        tmp_path / "c.zarr")
    key = {path: identification_key(counts, IdentificationSettings(rule="attribution", attribution=path))
           for path in (first, moved, other)}
    assert key[first] == key[moved] != key[other]  # the content key decides, not who filled the shards
    unkeyed = {k: write_store(attribution_store(store, 6).assign_attrs(max_response_tokens=k), tmp_path / f"{k}.zarr")
               for k in (8, 16)}  # written otherwise: every attribute counts
    assert len({identification_key(counts, IdentificationSettings(rule="attribution", attribution=path))
                for path in unkeyed.values()}) == 2
    # a frequency rule does not read the store: the path is inert
    assert (identification_key(counts, IdentificationSettings(attribution=first))
            == identification_key(counts, IdentificationSettings()))


# --- bad input ---------------------------------------------------------------------------------------------

def test_an_attribution_rule_without_or_with_a_mismatched_store_is_refused(tmp_path):
    store = moe_store(7, CATEGORIES)
    counts = write_store(store, tmp_path / "counts.zarr")
    settings = IdentificationSettings(rule="attribution_contrastive")
    with pytest.raises(ValueError, match="pass --attribution ATTR.zarr"):
        open_attribution(settings, store, counts)
    with pytest.raises(ValueError, match="need an attribution store"):
        identify(store, settings)
    shuffled = attribution_store(store, 7).isel(instruction=[1, 0, *range(2, 16)])
    wrong = write_store(shuffled, tmp_path / "shuffled.zarr")
    with pytest.raises(ValueError, match=f"{wrong} and the count store {counts}: the instructions differ"):
        open_attribution(settings.model_copy(update={"attribution": wrong}), store, counts)
    partial = write_store(attribution_store(store, 7).drop_vars("shared_act_attribution"), tmp_path / "partial.zarr")
    with pytest.raises(ValueError, match=r"lacks shared_act_attribution \(for shared_neurons\)"):
        open_attribution(settings.model_copy(update={"attribution": partial}), store, counts)
    assert open_attribution(IdentificationSettings(), store, counts) is None  # frequency rules never read it


def test_identify_command_with_an_attribution_store(tmp_path):
    store = moe_store(8, CATEGORIES)
    counts = write_store(store, tmp_path / "counts.zarr")
    estimates = write_store(attribution_store(store, 8), tmp_path / "attr.zarr")
    runner = CliRunner()
    base = ["identify", "--store", str(counts), "--rule", "attribution_contrastive", "--epsilon", "0.1",
            "--dask-workers", "1"]
    missing = runner.invoke(app, [*base, "--out", str(tmp_path / "none")])
    assert missing.exit_code == 2 and "pass --attribution ATTR.zarr" in missing.output
    assert not (tmp_path / "none").exists()  # refused before any work
    mismatched = write_store(attribution_store(store.isel(instruction=slice(0, 12)), 8), tmp_path / "short.zarr")
    wrong = runner.invoke(app, [*base, "--attribution", str(mismatched), "--out", str(tmp_path / "wrong")])
    assert wrong.exit_code == 2 and f"{mismatched} and the count store {counts}" in wrong.output
    done = runner.invoke(app, [*base, "--attribution", str(estimates), "--out", str(tmp_path / "run")])
    assert done.exit_code == 0, done.output
    written = xr.open_zarr(tmp_path / "run" / "components.zarr")
    means = naive_means(xr.open_zarr(estimates).act_attribution.values, np.array(CATEGORIES))
    np.testing.assert_array_equal(written.isn.values, naive_attribution_sets(means, "attribution_contrastive", 0.1))
    assert written.attrs["rule"] == "attribution_contrastive"
