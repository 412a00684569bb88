"""Every selection rule against a plain NumPy implementation of docs/method.md section 2 and 4a
(references.naive_rule; ties at the boundary, all-zero groups and components, fewer non-zero
values than m), lape also against a transcription of the released script's arithmetic, and bad
parameters refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from pydantic import ValidationError
from typer.testing import CliRunner

from sparcom.identification.settings import IdentificationSettings
from sparcom.identification.identify import identify, identify_store
from sparcom.identification.rules import select
from sparcom.identification.schema import RULES

from builders import make_store, write_store
from references import naive_rule

GROUPS = ["CLS", "CODE", "MATH", "QA"]


# --- the released script's arithmetic ------------------------------------------------------------------------

def released_lape(over_zero: np.ndarray, n: np.ndarray, top_rate: float, filter_rate: float,
                  bar_ratio: float) -> list[list[list[int]]]:
    """The arithmetic of identify.py in github.com/RUCAIBox/Language-Specific-Neurons, line by
    line (over_zero[layer, inter, lang], n[lang]), in float64; returns the script's final_indice."""
    over_zero = torch.tensor(over_zero, dtype=torch.float64)
    n = torch.tensor(n, dtype=torch.float64)
    num_layers, intermediate_size, lang_num = over_zero.size()
    activation_probs = over_zero / n
    normed_activation_probs = activation_probs / activation_probs.sum(dim=-1, keepdim=True)
    normed_activation_probs[torch.isnan(normed_activation_probs)] = 0
    log_probs = torch.where(normed_activation_probs > 0, normed_activation_probs.log(), 0)
    entropy = -torch.sum(normed_activation_probs * log_probs, dim=-1)
    flattened_probs = activation_probs.flatten()
    top_prob_value = flattened_probs.kthvalue(round(len(flattened_probs) * filter_rate)).values.item()
    top_position = (activation_probs > top_prob_value).sum(dim=-1)
    entropy[top_position == 0] = torch.inf
    flattened_entropy = entropy.flatten()
    top_entropy_value = round(len(flattened_entropy) * top_rate)
    _, index = flattened_entropy.topk(top_entropy_value, largest=False)
    row_index = index // entropy.size(1)
    col_index = index % entropy.size(1)
    selected_probs = activation_probs[row_index, col_index].transpose(0, 1)
    activation_bar = flattened_probs.kthvalue(round(len(flattened_probs) * bar_ratio)).values.item()
    lang, indice = torch.where(selected_probs > activation_bar)
    merged_index = torch.stack((row_index, col_index), dim=-1)
    final = [[[] for _ in range(num_layers)] for _ in range(lang_num)]
    for language, position in zip(lang.tolist(), indice.tolist()):
        layer, neuron = merged_index[position].tolist()
        final[language][layer].append(neuron)
    return [[sorted(h) for h in layers] for layers in final]


def as_frequency(p: np.ndarray, chunked: bool = False) -> xr.DataArray:
    array = xr.DataArray(p, dims=("group", "layer", "neuron"), coords={"group": GROUPS[:p.shape[0]]})
    return array.chunk({"group": 1, "layer": 2, "neuron": 7}) if chunked else array


def random_frequencies(seed: int, shape=(4, 5, 30), zero_share=0.3) -> np.ndarray:
    """Frequencies as counts / tokens: coarse values (ties happen), some exact zeros."""
    rng = np.random.default_rng(seed)
    p = rng.integers(0, 12, shape) / 11.0
    p[rng.random(shape) < zero_share] = 0.0
    return p


PARAMETERS = {"epsilon": 0.07, "tau": 0.4, "top_rate": 0.05, "filter_rate": 0.8, "bar_ratio": 0.7}


def run_rule(p: xr.DataArray, rule: str, **overrides) -> xr.Dataset:
    return select(p, rule, layer_dim="layer", **{**PARAMETERS, **overrides})


# --- each rule against the reference ----------------------------------------------------------

@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_rule_matches_the_spec_text(rule, seed, chunked):
    p = random_frequencies(seed)
    got = run_rule(as_frequency(p, chunked), rule).selected.transpose("group", "layer", "neuron").values
    np.testing.assert_array_equal(got, naive_rule(p, rule, **PARAMETERS))


@pytest.mark.parametrize("rule", RULES)
def test_all_zero_groups_and_components_are_never_selected(rule):
    p = random_frequencies(4, zero_share=0.1)
    p[2] = 0.0           # MATH never active
    p[:, 1, 3] = 0.0     # one component never active anywhere
    selected = run_rule(as_frequency(p), rule).selected
    assert not selected.sel(group="MATH").any()
    assert not selected.isel(layer=1, neuron=3).any()
    np.testing.assert_array_equal(selected.values, naive_rule(p, rule, **PARAMETERS))


@pytest.mark.parametrize("rule", ["global_percentile", "layer_percentile", "contrastive"])
def test_fewer_non_zero_values_than_m_selects_only_those(rule):
    p = np.zeros((2, 2, 10))
    p[0, 0, [1, 4]] = [0.3, 0.1]   # CLS: two non-zero values, m = 10 under epsilon 0.5
    p[0, 1, 7] = 0.2
    p[1, 0, 0] = 0.05              # CODE: one
    selected = run_rule(as_frequency(p), rule, epsilon=0.5).selected.values
    assert selected.sum() == 4 and selected[0, 0, [1, 4]].all() and selected[0, 1, 7] and selected[1, 0, 0]
    np.testing.assert_array_equal(selected, naive_rule(p, rule, epsilon=0.5))


def test_ties_at_the_boundary_are_kept_by_contrastive_and_lape():
    p = np.zeros((2, 1, 8))
    p[0, 0] = [0.9, 0.6, 0.6, 0.6, 0.1, 0.1, 0.0, 0.0]
    p[1, 0] = [0.1, 0.1, 0.1, 0.1, 0.1, 0.5, 0.3, 0.0]
    # CLS margins: 0.8, 0.5, 0.5, 0.5, 0, -0.4, -0.3, 0; m = 2 -> threshold 0.5, three-way tie
    contrastive = run_rule(as_frequency(p), "contrastive", epsilon=0.25)
    assert contrastive.selected.sel(group="CLS").values.ravel().tolist() == [True] * 4 + [False] * 4
    assert float(contrastive.threshold.sel(group="CLS")) == pytest.approx(0.5)
    # lape: entropies rank neuron 6 (0), 0, then 1-3 tied; keeping round(8 * 0.375) = 3 keeps all
    # five; filter value and bar are both 0.1 (the 8th smallest of 16 values)
    lape = run_rule(as_frequency(p), "lape", top_rate=0.375, filter_rate=0.5, bar_ratio=0.5)
    np.testing.assert_array_equal(lape.selected.values, naive_rule(p, "lape", top_rate=0.375, filter_rate=0.5,
                                                                   bar_ratio=0.5))
    assert np.flatnonzero(lape.selected.sel(group="CLS").values).tolist() == [0, 1, 2, 3]
    assert np.flatnonzero(lape.selected.sel(group="CODE").values).tolist() == [6]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_lape_matches_the_released_script(seed):
    """Random counts where the entropy boundary has no tie (the script's topk then has exactly
    one answer) and there are enough candidates: the same neurons per language and layer."""
    rng = np.random.default_rng(100 + seed)
    layers, inter, langs = 4, 50, 5
    n = rng.integers(200, 400, langs)
    over_zero = (rng.random((layers, inter, langs)) ** 3 * n).astype(np.int64)
    top_rate, filter_rate, bar_ratio = 0.05, 0.9, 0.9
    expected = released_lape(over_zero, n, top_rate, filter_rate, bar_ratio)
    frequency = xr.DataArray((over_zero / n).transpose(2, 0, 1), dims=("group", "layer", "neuron"),
                             coords={"group": [f"l{k}" for k in range(langs)]})
    got = select(frequency, "lape", top_rate=top_rate, filter_rate=filter_rate, bar_ratio=bar_ratio).selected
    for language in range(langs):
        for layer in range(layers):
            assert np.flatnonzero(got.values[language, layer]).tolist() == expected[language][layer]
    assert got.sum() > 0


def test_lape_thresholds_are_global_over_groups():
    """One group far more active than the others: the global bar leaves the others out, where a
    per-group quantile would give every group members."""
    p = np.full((3, 1, 40), 0.01)
    p[0, 0, :10] = np.linspace(0.5, 0.9, 10)
    selected = run_rule(as_frequency(p), "lape", top_rate=0.25, filter_rate=0.9, bar_ratio=0.9).selected
    assert selected.sel(group="CLS").sum() == 10 and not selected.sel(group=["CODE", "MATH"]).any()


# --- identification with the new rules, and bad parameters -----------------------------------

def small_store(categories=("CLS", "CODE", "QA", "CLS", "CODE", "QA", "CLS", "CODE", "QA")):
    rng = np.random.default_rng(9)
    tokens = rng.integers(10, 30, len(categories))
    counts = rng.integers(0, 10, (len(categories), 3, 12)).clip(max=tokens[:, None, None])
    return make_store(counts, tokens, list(categories))


@pytest.mark.parametrize("rule", ["lape", "contrastive"])
def test_identify_store_with_the_new_rules(tmp_path, rule):
    store = small_store()
    settings = IdentificationSettings(rule=rule, epsilon=0.1, top_rate=0.1, filter_rate=0.8, bar_ratio=0.7)
    components = xr.open_zarr(identify_store(write_store(store, tmp_path / "s.zarr"), settings, tmp_path / "o")).load()
    p = components.frequency.transpose("group", "layer", "neuron").values
    np.testing.assert_array_equal(components.isn.values, naive_rule(
        p, rule, epsilon=0.1, top_rate=0.1, filter_rate=0.8, bar_ratio=0.7))
    assert components.attrs["rule"] == rule and components.attrs["top_rate"] == 0.1
    assert components.attrs["bar_ratio"] == 0.7 and components.attrs["epsilon"] == 0.1


@pytest.mark.parametrize("field, value", [("top_rate", 0.0), ("top_rate", 1.0), ("filter_rate", 1.2),
                                          ("bar_ratio", -0.1), ("epsilon", 0.0), ("epsilon", 1.5)])
def test_bad_parameters_are_refused(field, value):
    with pytest.raises(ValidationError, match=field):
        IdentificationSettings(**{field: value})
    IdentificationSettings(epsilon=1.0)  # epsilon's interval is closed at 1


@pytest.mark.parametrize("rule", ["lape", "contrastive"])
def test_a_rule_comparing_groups_refuses_one_group_before_any_work(tmp_path, monkeypatch, rule):
    import sparcom.identification.identify

    def no_work(*args, **kwargs):
        raise AssertionError("the counts were read before the check")

    monkeypatch.setattr(sparcom.identification.identify, "one_pass_sums", no_work)
    monkeypatch.setattr(sparcom.identification.identify, "group_frequencies", no_work)
    path = write_store(small_store(("CLS",) * 6), tmp_path / "s.zarr")
    with pytest.raises(ValueError, match=f"rule '{rule}' compares groups.*1 group"):
        identify_store(path, IdentificationSettings(rule=rule), tmp_path / "o")
    with pytest.raises(ValueError, match="compares groups"):
        identify(small_store(("CLS",) * 6), IdentificationSettings(rule=rule))


def test_cli_refuses_a_bad_rate(tmp_path):
    from cli.app import app

    path = write_store(small_store(), tmp_path / "s.zarr")
    result = CliRunner().invoke(app, ["identify", "--store", str(path), "--out", str(tmp_path / "o"),
                                      "--rule", "lape", "--top-rate", "1.5"])
    assert result.exit_code != 0
    assert "top_rate" in str(result.exception) + result.output
    assert not (tmp_path / "o").exists()


def test_comparison_checks_the_parameters_of_the_rule_used():
    from sparcom.comparison.compare import ComparisonError, check_components_compatible

    store = small_store()
    lape = IdentificationSettings(rule="lape", top_rate=0.1, filter_rate=0.8, bar_ratio=0.7)
    base = identify(store, lape)
    tuned = identify(store, lape.model_copy(update={"epsilon": 0.5}))
    check_components_compatible(base, tuned)  # epsilon is inert for lape
    for name in ("top_rate", "filter_rate", "bar_ratio"):
        changed = identify(store, lape.model_copy(update={name: 0.6}))
        with pytest.raises(ComparisonError, match=f"{name} differs"):
            check_components_compatible(base, changed)
    contrastive = IdentificationSettings(rule="contrastive", epsilon=0.1)
    with pytest.raises(ComparisonError, match="epsilon differs"):
        check_components_compatible(identify(store, contrastive),
                                    identify(store, contrastive.model_copy(update={"epsilon": 0.2})))
