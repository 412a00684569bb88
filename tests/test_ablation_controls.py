"""Controls, figures and the held-out split on constructed inputs with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from sparcom.ablation.ablate import split_held_out
from sparcom.ablation.controls import (
    distinct_random_controls, frequency_matched_control, overall_frequency, random_control,
)
from sparcom.ablation.statistics import ablation_figures
from sparcom.identification.schema import FAMILIES
from sparcom.curation.records import record_hash

from builders import make_record


def _set(layers: int = 4, width: int = 50, seed: int = 0) -> tuple[xr.DataArray, xr.DataArray]:
    rng = np.random.default_rng(seed)
    selected = xr.DataArray(rng.random((layers, width)) < 0.15, dims=("layer", "neuron"))
    selected[2] = False  # a layer without members draws nothing
    frequency = xr.DataArray(rng.random((layers, width)), dims=("layer", "neuron"))
    return selected, frequency


@pytest.mark.parametrize("draw", ["random", "frequency_matched"])
def test_controls_match_the_set_per_layer_and_avoid_it(draw):
    selected, frequency = _set()
    for seed in range(5):
        rng = np.random.default_rng(seed)
        control = (random_control(selected, "layer", rng) if draw == "random"
                   else frequency_matched_control(selected, frequency, "layer", rng))
        assert control.dims == selected.dims
        np.testing.assert_array_equal(control.sum("neuron").values, selected.sum("neuron").values)
        assert not (control & selected).any()


def test_frequency_matched_takes_the_nearest_free_component():
    # one layer, a set of two; outside frequencies chosen so the nearest free ones are known
    frequency = xr.DataArray([[0.50, 0.10, 0.49, 0.80, 0.11, 0.30]], dims=("layer", "neuron"))
    selected = xr.DataArray([[True, True, False, False, False, False]], dims=("layer", "neuron"))
    control = frequency_matched_control(selected, frequency, "layer", np.random.default_rng(0))
    assert np.flatnonzero(control.values[0]).tolist() == [2, 4]
    # two members compete for one nearest component: the second takes the next nearest
    frequency = xr.DataArray([[0.50, 0.50, 0.49, 0.10, 0.60]], dims=("layer", "neuron"))
    selected = xr.DataArray([[True, True, False, False, False]], dims=("layer", "neuron"))
    control = frequency_matched_control(selected, frequency, "layer", np.random.default_rng(0))
    assert np.flatnonzero(control.values[0]).tolist() == [2, 4]


def test_frequency_matching_is_closer_than_random():
    selected, frequency = _set(layers=3, width=400, seed=2)
    gap = {}
    for name in ("random", "frequency_matched"):
        gaps = []
        for seed in range(3):
            rng = np.random.default_rng(seed)
            control = (random_control(selected, "layer", rng) if name == "random"
                       else frequency_matched_control(selected, frequency, "layer", rng))
            gaps.append(abs(float(frequency.where(control).mean()) - float(frequency.where(selected).mean())))
        gap[name] = np.mean(gaps)
    assert gap["frequency_matched"] < 0.01 < gap["random"]


def test_ties_are_broken_by_the_seed():
    frequency = xr.DataArray([[0.5] + [0.3] * 20], dims=("layer", "neuron"))
    selected = xr.DataArray([[True] + [False] * 20], dims=("layer", "neuron"))
    picks = {int(np.flatnonzero(frequency_matched_control(selected, frequency, "layer",
                                                          np.random.default_rng(s)).values[0])[0])
             for s in range(10)}
    assert len(picks) > 3


def test_distinct_random_controls():
    selected = xr.DataArray([[True, True, False, False, False], [True, False, False, False, False]],
                            dims=("layer", "neuron"))
    assert distinct_random_controls(selected, "layer") == 3 * 4  # C(3, 2) * C(4, 1)
    selected[0, :4] = True
    assert distinct_random_controls(selected, "layer") == 0


def test_overall_frequency_is_the_token_weighted_mean():
    family = next(f for f in FAMILIES if f.name == "neurons")
    counts = np.array([[3, 0], [1, 4]], dtype=float)  # [group, neuron] summed counts
    tokens = np.array([10.0, 30.0])
    components = xr.Dataset({
        "frequency": (("group", "layer", "neuron"), (counts / tokens[:, None])[:, None, :]),
        "token_total": ("group", tokens)})
    np.testing.assert_allclose(overall_frequency(components, family).values, [[4 / 40, 4 / 40]])


def _nll(groups, labels, base, effect):
    """nll[ablated, instruction] = base + effect[ablated][label of the record]."""
    return xr.DataArray([[base[i] + effect[g][labels[i]] for i in range(len(labels))] for g in groups],
                        dims=("ablated", "instruction"), coords={"ablated": groups})


def test_figures_on_a_known_answer():
    groups = ["A", "B", "C"]
    labels = np.array(["A"] * 4 + ["B"] * 4 + ["C"] * 4)
    rng = np.random.default_rng(0)
    base = xr.DataArray(rng.random(12) + 2, dims="instruction")
    effect = {"A": {"A": 1.0, "B": 0.2, "C": 0.3}, "B": {"A": 0.1, "B": 0.5, "C": 0.1},
              "C": {"A": 0.0, "B": 0.0, "C": 0.0}}
    nll = _nll(groups, labels, base, effect)
    control_effect = {g: {h: 0.25 for h in groups} for g in groups}
    control = _nll(groups, labels, base, control_effect).expand_dims(control=["random"], seed=[0, 1])
    figures = ablation_figures(base, nll, control, labels, resamples=200, permutations=500, seed=0)
    np.testing.assert_allclose(figures.delta.sel(ablated="A").values, [1.0, 0.2, 0.3])
    np.testing.assert_allclose(figures.delta_other.values, [0.25, 0.1, 0.0], atol=1e-12)
    np.testing.assert_allclose(figures.specificity.values[:2], [4.0, 5.0])
    assert np.isnan(figures.specificity.values[2])  # 0 / 0
    np.testing.assert_allclose(figures.control_ratio.sel(control="random").values, [4.0, 2.0, 0.0])
    # every record's effect is exactly the same, so each resample gives the same figure
    np.testing.assert_allclose(figures.specificity_ci.sel(ablated="A").values, [4.0, 4.0])
    p = figures.control_p_value.sel(control="random")
    # 4 records, all 2^4 sign patterns: only the observed one reaches the observed mean
    assert float(p.sel(ablated="A")) == 1 / 16 and float(p.sel(ablated="C")) == 1.0
    np.testing.assert_allclose(figures.control_difference.sel(control="random").values, [0.75, 0.25, -0.25])
    np.testing.assert_allclose(figures.specific_difference.values, [0.75, 0.4, 0.0], atol=1e-12)


def test_held_out_split_is_disjoint_by_record_hash():
    records = [make_record(i, category, f"Question {i} of {category}?") for i, category in
               enumerate(["CLS", "CODE", "QA"] * 10)]
    identify, evaluate = split_held_out(records, 0.3, seed=4)
    assert not {record_hash(r) for r in identify} & {record_hash(r) for r in evaluate}
    assert len(identify) + len(evaluate) == len(records)
    assert {c: sum(r.category == c for r in evaluate) for c in ("CLS", "CODE", "QA")} == {"CLS": 3, "CODE": 3, "QA": 3}
    again = split_held_out(records, 0.3, seed=5)[1]
    assert {r.id for r in again} != {r.id for r in evaluate}


def test_split_dataset_saves_two_disjoint_parts(tmp_path):
    from sparcom.ablation.ablate import split_dataset
    from sparcom.curation.dataset import load_records, save_dataset

    records = [make_record(i, category, f"Task {i} for {category}.") for i, category in enumerate(["GEN", "SUM"] * 5)]
    save_dataset(records, tmp_path / "all")
    identify, evaluate = split_dataset(tmp_path / "all", 0.4, 0, tmp_path / "datasets")
    kept, held = load_records(identify), load_records(evaluate)
    assert {record_hash(r) for r in kept}.isdisjoint(record_hash(r) for r in held)
    assert sorted(r.id for r in kept + held) == sorted(r.id for r in records)
    assert sorted(r.category for r in held) == ["GEN", "GEN", "SUM", "SUM"]
