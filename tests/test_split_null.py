"""The split-half null (docs/method.md section 4b) and rules side by side: a planted
group-specific set clears the null, stores without structure do so at the test's level, the
batches do not change the null, one permutation's gap against NumPy written here; several rules
from one pass give each rule's run as if alone; the command line's --rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr
import zarr
from typer.testing import CliRunner

from cli.app import app
from sparcom.identification.generality import analyze
from sparcom.identification.identify import identify, identify_store, identify_store_rules, split_null_gaps
from sparcom.identification.keys import identification_key
from sparcom.identification.report import reproducible
from sparcom.identification.schema import RULES
from sparcom.identification.settings import IdentificationSettings
from sparcom.identification.split_half import PERMUTATION_SEED, half_assignment

from builders import make_store, write_store
from references import naive_rule

GROUPS = ["CLS", "CODE", "GEN", "MATH", "QA", "SUM"]
PARAMETERS = dict(epsilon=0.1, top_rate=0.1, filter_rate=0.8, bar_ratio=0.8)


def random_store(seed: int, per_group: int = 6, groups=GROUPS[:4], shape=(2, 20), planted: str | None = None):
    """Every instruction fires each component at the component's own rate, whatever its group;
    with `planted`, that group's instructions also fire 4 components the others almost never do."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(groups, per_group)
    tokens = rng.integers(30, 50, len(labels))
    rates = np.broadcast_to(rng.beta(0.5, 3.0, shape), (len(labels), *shape)).copy()
    if planted:
        chosen = np.zeros(shape, bool)
        chosen.ravel()[rng.choice(chosen.size, 4, replace=False)] = True
        rates[:, chosen] = 0.01
        rates[np.ix_(labels == planted)] = np.where(chosen, 0.9, rates[labels == planted])
    return make_store(rng.binomial(tokens[:, None, None], rates), tokens, labels.tolist())


def null_of(store, group: str, **settings) -> dict:
    analysis = analyze(identify(store, IdentificationSettings(**settings)))
    return {name: float(analysis[f"neurons_{name}"].sel(group=group))
            for name in ("specificity_gap", "split_null_q95", "split_p")}


@pytest.mark.parametrize("rule", ["global_percentile", "lape", "contrastive"])
def test_a_planted_group_specific_set_clears_the_null(rule):
    found = null_of(random_store(1, per_group=12, groups=GROUPS, shape=(2, 50), planted="CODE"), "CODE",
                    rule=rule, epsilon=0.04, top_rate=0.04, filter_rate=0.9, bar_ratio=0.9)
    assert found["split_p"] < 0.01 and found["specificity_gap"] > found["split_null_q95"]


def test_without_structure_the_null_rejects_at_its_level():
    """p < 0.05 in at most 12 of 100 stores whose groups differ in nothing (expected about 5)."""
    p = [null_of(random_store(seed), "CLS", split_half_seeds=2, split_half_permutations=99, epsilon=0.1)["split_p"]
         for seed in range(100)]
    assert not any(math.isnan(v) for v in p)
    assert sum(v < 0.05 for v in p) <= 12


def _labels_and_origins(store):
    return np.array(store.category.values, dtype=str), np.array(store.origin.values, dtype=str)


def test_the_batches_do_not_change_the_null(tmp_path):
    """One permutation a batch (a bound of one byte) against all in one, on a chunked store."""
    store = random_store(3)
    lazy = xr.open_zarr(write_store(store, tmp_path / "s.zarr"))
    labels, origins = _labels_and_origins(store)
    rules = {rule: IdentificationSettings(rule=rule, **PARAMETERS) for rule in ("global_percentile", "lape", "contrastive")}
    one_each = split_null_gaps(lazy, labels, origins, rules, 12, 3, batch_bytes=1)
    all_at_once = split_null_gaps(lazy, labels, origins, rules, 12, 3, batch_bytes=2**40)
    for rule in rules:
        np.testing.assert_array_equal(one_each[rule]["neurons"].values, all_at_once[rule]["neurons"].values)
        assert one_each[rule]["neurons"].sizes == {"permutation": 12, "group": 4}


@pytest.mark.parametrize("rule", ["global_percentile", "lape", "contrastive"])
def test_one_permutations_gap_equals_numpy(rule):
    store = random_store(4)
    labels, origins = _labels_and_origins(store)
    counts, tokens = store.act_count.values.astype(np.int64), store.token_count.values.astype(np.int64)
    null = split_null_gaps(store, labels, origins, {rule: IdentificationSettings(rule=rule, **PARAMETERS)}, 3, 2)
    k = 2  # permutation k: the labels in the order of a generator seeded (PERMUTATION_SEED, k)
    shuffled = labels[np.random.default_rng((PERMUTATION_SEED, k)).permutation(len(labels))]
    in_a, _ = half_assignment(shuffled, origins, 2)
    groups = sorted(set(labels))
    jaccard = np.zeros((2, len(groups), len(groups)))
    for seed in range(2):
        sets = []
        for half in (in_a[seed], ~in_a[seed]):
            p = np.stack([counts[(shuffled == g) & half].sum(0) / tokens[(shuffled == g) & half].sum() for g in groups])
            sets.append(naive_rule(p, rule, **PARAMETERS))
        for i in range(len(groups)):
            for j in range(len(groups)):
                union = (sets[0][i] | sets[1][j]).sum()
                jaccard[seed, i, j] = (sets[0][i] & sets[1][j]).sum() / union if union else np.nan
    mean = np.nanmean(jaccard, axis=0)
    expected = [mean[i, i] - np.nanmean(np.delete(mean[i], i)) for i in range(len(groups))]
    np.testing.assert_allclose(null[rule]["neurons"].values[k], expected, rtol=0, atol=1e-12)


def test_p_and_q95_follow_their_definitions():
    store = random_store(5)
    analysis = analyze(identify(store, IdentificationSettings(split_half_permutations=30, **PARAMETERS)))
    components = identify(store, IdentificationSettings(split_half_permutations=30, **PARAMETERS))
    for group in ["CLS", "CODE"]:
        null = components.neurons_split_null_gap.sel(group=group).values
        gap = float(analysis.neurons_specificity_gap.sel(group=group))
        kept = null[~np.isnan(null)]
        assert float(analysis.neurons_split_p.sel(group=group)) == (1 + (kept >= gap).sum()) / (1 + len(kept))
        assert float(analysis.neurons_split_null_q95.sel(group=group)) == pytest.approx(np.quantile(kept, 0.95))


def test_the_verdict_is_decided_by_the_numbers():
    assert reproducible(0.10, 0.04, 200, None) == (True, None)
    assert reproducible(0.04, 0.04, 200, None) == (False, None)  # at the 95th percentile: not above it
    verdict, reason = reproducible(0.10, 0.04, 10, None)
    assert verdict is None and "p cannot go below 1/11" in reason
    assert reproducible(0.10, None, 0, "switched off") == (None, "switched off")
    assert reproducible(None, None, 200, None)[0] is None


def test_the_null_switched_off_says_so_in_the_report(tmp_path):
    path = identify_store(write_store(random_store(6), tmp_path / "s.zarr"),
                          IdentificationSettings(split_half_permutations=0), tmp_path / "out")
    from sparcom.identification.report import report_generality

    summary = report_generality(path, tmp_path / "out")
    assert "neurons_split_null_gap" not in xr.open_zarr(path)
    row = summary["families"]["neurons"]["split_half"]["CLS"]
    assert row["reproducible"] is None and "switched off" in row["undecided"]
    assert "undecided: the split-half null switched off" in (tmp_path / "out" / "report.md").read_text()


def test_several_rules_from_one_pass_equal_each_rule_alone(tmp_path):
    path = write_store(random_store(7), tmp_path / "s.zarr")
    rules = ["global_percentile", "lape", "contrastive", "layer_percentile", "threshold"]
    together = IdentificationSettings(rules=rules, split_half_permutations=15, tau=0.05, **PARAMETERS)
    written = identify_store_rules(path, together, {rule: tmp_path / "together" / rule for rule in rules})
    for rule in rules:
        alone = IdentificationSettings(rule=rule, split_half_permutations=15, tau=0.05, **PARAMETERS)
        xr.testing.assert_identical(xr.open_zarr(written[rule]).load(),
                                    xr.open_zarr(identify_store(path, alone, tmp_path / "alone" / rule)).load())
    zarr.open_group(path, mode="r+").attrs["extraction_key"] = "e" * 64  # as extraction leaves it
    for rule in rules:  # the same run folder, whether the rule runs alone or beside others
        alone = IdentificationSettings(rule=rule, split_half_permutations=15, tau=0.05, **PARAMETERS)
        assert identification_key(path, together.for_rule(rule)) == identification_key(path, alone)
    with pytest.raises(ValueError, match="a key per rule"):
        identification_key(path, together)


def test_settings_name_rule_or_rules():
    assert IdentificationSettings(rules=["lape", "contrastive"]).selected_rules() == ["lape", "contrastive"]
    assert IdentificationSettings(rule="lape").selected_rules() == ["lape"]
    again = IdentificationSettings.model_validate(IdentificationSettings(rules=["lape", "contrastive"]).model_dump())
    assert again.selected_rules() == ["lape", "contrastive"]
    for bad, message in [({"rules": []}, "at least one"), ({"rules": ["lape", "lape"]}, "more than once"),
                         ({"rule": "threshold", "rules": ["lape"]}, "not both")]:
        with pytest.raises(ValueError, match=message):
            IdentificationSettings(**bad)


@pytest.mark.parametrize("options, named", [
    (["--rules", "global_percentile,frequent"], "'frequent'"),
    (["--rule", "lape", "--rules", "lape,contrastive"], "not both"),
])
def test_cli_rules_refused_in_one_line(tmp_path, options, named):
    path = write_store(random_store(8), tmp_path / "s.zarr")
    result = CliRunner().invoke(app, ["identify", "--store", str(path), "--out", str(tmp_path / "o"), *options])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in result.output
    if "frequent" in named:
        assert all(rule in lines[0] for rule in RULES)
    assert not (tmp_path / "o").exists()


def test_cli_identify_with_two_rules_writes_a_run_folder_each(tmp_path):
    path = write_store(random_store(9), tmp_path / "s.zarr")
    result = CliRunner().invoke(app, ["identify", "--store", str(path), "--out", str(tmp_path / "o"),
                                      "--rules", "global_percentile,lape", "--split-half-permutations", "20",
                                      "--epsilon", "0.1", "--dask-workers", "1"])
    assert result.exit_code == 0, result.output
    for rule in ("global_percentile", "lape"):
        summary = xr.open_zarr(tmp_path / "o" / rule / "components.zarr").attrs
        assert summary["rule"] == rule and summary["split_half_permutations"] == 20
        assert "null q95" in (tmp_path / "o" / rule / "report.md").read_text()
