"""Before/after comparison: every figure against a plain NumPy/Python computation on constructed
component datasets (dense and MoE), known answers, refusals of mismatched inputs, the report,
the model pairs, and the comparison flow and CLI on two small real stores."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from typer.testing import CliRunner

from sparcom.comparison.compare import (
    ComparisonError, check_components_compatible, check_stores_compatible, compare_components,
    jensen_shannon, layer_shift, load_model_pairs, model_pair, top_movers,
)
from sparcom.comparison.report import link_into_report, write_comparison_report

GROUPS = ["CODE", "GEN", "MATH", "QA"]
DENSE_LAYERS = [0, 2, 5]          # true indices with uneven gaps: the EMD is measured in layers
MOE_LAYERS = [1, 3, 4]
NEURONS, EXPERTS, EXPERT_NEURONS, SHARED = 10, 4, 3, 5
ATTRS = {"model": "base-model", "model_fingerprint": "a" * 64, "architecture": "qwen2_moe",
         "dataset_hash": "d" * 64, "token_span": "prompt", "group_by": "category",
         "rule": "global_percentile", "epsilon": 0.1, "tau": 0.5}

# (selected, frequency, layer coordinate, component dims after the layer dim)
DENSE = ("isn", "frequency", "layer", ("neuron",))
MOE = [("ise", "expert_frequency", "moe_layer", ("expert",)),
       ("expert_isn", "expert_neuron_frequency", "moe_layer", ("expert", "expert_neuron")),
       ("shared_isn", "shared_frequency", "moe_layer", ("shared_neuron",))]
SIZES = {"neuron": NEURONS, "expert": EXPERTS, "expert_neuron": EXPERT_NEURONS, "shared_neuron": SHARED}


def frequencies(rng, layers: int, within: tuple[str, ...]) -> np.ndarray:
    return rng.random((len(GROUPS), layers, *[SIZES[d] for d in within]))


def build(frequency_by_family: dict, model: str = "base-model", moe: bool = True) -> xr.Dataset:
    """A components dataset; a component is selected when its frequency is at least 0.7."""
    data = {"token_total": (("group",), np.array([120, 80, 100, 90]))}
    families = [DENSE] + (MOE if moe else [])
    for selected, frequency, layer_dim, within in families:
        values = frequency_by_family[frequency]
        dims = ("group", layer_dim, *within)
        data[frequency] = (dims, values)
        data[selected] = (dims, values >= 0.7)
    coords = {"group": GROUPS, "layer": DENSE_LAYERS}
    if moe:
        coords["moe_layer"] = MOE_LAYERS
    return xr.Dataset(data, coords=coords, attrs={**ATTRS, "model": model,
                                                  "model_fingerprint": model[0] * 64})


def pair(seed: int = 0, moe: bool = True) -> tuple[xr.Dataset, xr.Dataset]:
    """Base frequencies, and tuned ones moved by noise (so that sets overlap but differ)."""
    rng = np.random.default_rng(seed)
    base, tuned = {}, {}
    for _, frequency, layer_dim, within in [DENSE] + (MOE if moe else []):
        layers = len(DENSE_LAYERS if layer_dim == "layer" else MOE_LAYERS)
        base[frequency] = frequencies(rng, layers, within)
        tuned[frequency] = np.clip(base[frequency] + rng.normal(0, 0.15, base[frequency].shape), 0, 1)
    # One group keeps its dense set empty in one layer in both models, to exercise the NaN path.
    for values in (base["frequency"], tuned["frequency"]):
        values[3, 1] = 0.1
    return build(base, "base-model", moe), build(tuned, "tuned-model", moe)


# --- naive references -------------------------------------------------------------------------

def members(selected: np.ndarray, group: int, layer: int | None = None) -> set[tuple]:
    """Components of one group's set as index tuples (layer first), optionally of one layer."""
    found = {tuple(int(i) for i in index) for index in np.argwhere(selected[group])}
    return found if layer is None else {c for c in found if c[0] == layer}


def naive_jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else math.nan


def naive_distribution(sizes: list[int]) -> list[float] | None:
    total = sum(sizes)
    return None if total == 0 else [s / total for s in sizes]


def naive_js(p: list[float], q: list[float]) -> float:
    def kl(x, m):
        return sum(xi * math.log2(xi / mi) for xi, mi in zip(x, m) if xi > 0)
    m = [(a + b) / 2 for a, b in zip(p, q)]
    return (kl(p, m) + kl(q, m)) / 2


def naive_emd(p: list[float], q: list[float], positions: list[float]) -> float:
    """1-D transport cost from the quantile functions: integral over u of |P^-1(u) - Q^-1(u)|."""
    def quantile(weights, u):
        total = 0.0
        for weight, position in zip(weights, positions):
            total += weight
            if u < total - 1e-12:
                return position
        return positions[max(i for i, w in enumerate(weights) if w > 0)]
    cuts = sorted({0.0, 1.0, *itertools.accumulate(p), *itertools.accumulate(q)})
    cuts = [c for c in cuts if 0 <= c <= 1]
    return sum((b - a) * abs(quantile(p, (a + b) / 2) - quantile(q, (a + b) / 2))
               for a, b in zip(cuts, cuts[1:]) if b > a)


def close(actual, expected, tol=1e-9) -> bool:
    actual = float(actual)
    return (math.isnan(actual) and math.isnan(expected)) or abs(actual - expected) <= tol


def check_family(result: xr.Dataset, base: xr.Dataset, tuned: xr.Dataset, selected: str, frequency: str,
                 layer_dim: str) -> None:
    before, after = base[selected].values, tuned[selected].values
    positions = result[layer_dim].values.tolist()
    n_layers = len(positions)
    for g, group in enumerate(GROUPS):
        at = {"group": group}
        a_all, b_all = members(before, g), members(after, g)
        for layer in range(n_layers):
            a, b = members(before, g, layer), members(after, g, layer)
            here = {**at, layer_dim: positions[layer]}
            assert int(result[f"{selected}_kept"].sel(here)) == len(a & b)
            assert int(result[f"{selected}_gained"].sel(here)) == len(b - a)
            assert int(result[f"{selected}_lost"].sel(here)) == len(a - b)
            assert int(result[f"{selected}_base_size"].sel(here)) == len(a)
            assert int(result[f"{selected}_tuned_size"].sel(here)) == len(b)
            assert close(result[f"{selected}_jaccard"].sel(here), naive_jaccard(a, b))
        assert int(result[f"{selected}_kept_total"].sel(at)) == len(a_all & b_all)
        assert int(result[f"{selected}_gained_total"].sel(at)) == len(b_all - a_all)
        assert int(result[f"{selected}_lost_total"].sel(at)) == len(a_all - b_all)
        assert close(result[f"{selected}_jaccard_total"].sel(at), naive_jaccard(a_all, b_all))

        p = naive_distribution([len(members(before, g, layer)) for layer in range(n_layers)])
        q = naive_distribution([len(members(after, g, layer)) for layer in range(n_layers)])
        assert p is not None and q is not None, "constructed sets should not be empty"
        assert close(result[f"{selected}_layer_tv"].sel(at), sum(abs(x - y) for x, y in zip(p, q)) / 2)
        assert close(result[f"{selected}_layer_js"].sel(at), naive_js(p, q))
        assert close(result[f"{selected}_layer_emd"].sel(at), naive_emd(p, q, positions))

        delta = tuned[frequency].values[g] - base[frequency].values[g]
        assert np.array_equal(result[f"{frequency}_delta"].sel(at).values, delta)
        for layer in range(n_layers):
            assert close(result[f"{frequency}_mean_abs_delta"].sel({**at, layer_dim: positions[layer]}),
                         float(np.mean(np.abs(delta[layer]))), 1e-12)
            assert close(result[f"{frequency}_max_abs_delta"].sel({**at, layer_dim: positions[layer]}),
                         float(np.max(np.abs(delta[layer]))), 1e-12)
        assert close(result[f"{frequency}_mean_abs_delta_total"].sel(at), float(np.mean(np.abs(delta))), 1e-12)

        status = result[f"{selected}_status"].sel(at).values
        for index in np.ndindex(status.shape):
            expected = {(True, True): 1, (False, True): 2, (True, False): 3, (False, False): 0}[
                (index in a_all, index in b_all)]
            assert status[index] == expected

    # general (in every group) and unique (in exactly one group) sets
    def general(selected_values):
        return set.intersection(*(members(selected_values, g) for g in range(len(GROUPS))))

    def unique(selected_values, g):
        others = set().union(*(members(selected_values, h) for h in range(len(GROUPS)) if h != g))
        return members(selected_values, g) - others

    ga, gb = general(before), general(after)
    assert int(result[f"{selected}_general_kept_total"]) == len(ga & gb)
    assert int(result[f"{selected}_general_gained_total"]) == len(gb - ga)
    assert int(result[f"{selected}_general_lost_total"]) == len(ga - gb)
    for g, group in enumerate(GROUPS):
        ua, ub = unique(before, g), unique(after, g)
        assert int(result[f"{selected}_unique_kept_total"].sel(group=group)) == len(ua & ub)
        assert int(result[f"{selected}_unique_gained_total"].sel(group=group)) == len(ub - ua)
        assert int(result[f"{selected}_unique_lost_total"].sel(group=group)) == len(ua - ub)
        for layer in range(n_layers):
            here = {"group": group, layer_dim: positions[layer]}
            assert int(result[f"{selected}_unique_gained"].sel(here)) == len(
                {c for c in ub - ua if c[0] == layer})


# --- every figure against the naive computation ---------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_dense_comparison_matches_naive(seed):
    base, tuned = pair(seed, moe=False)
    result = compare_components(base, tuned)
    check_family(result, base, tuned, "isn", "frequency", "layer")
    assert "ise" not in result.attrs["families"] and "expert_selection_js" not in result
    # the group whose layer-2 set is empty in both: Jaccard of that layer is undefined
    assert np.isnan(float(result.isn_jaccard.sel(group="QA", layer=2)))
    assert int(result.isn_kept.sel(group="QA", layer=2)) == 0


def test_moe_comparison_matches_naive():
    base, tuned = pair(3, moe=True)
    result = compare_components(base, tuned)
    assert result.attrs["families"] == ["isn", "ise", "expert_isn", "shared_isn"]
    check_family(result, base, tuned, "isn", "frequency", "layer")
    for selected, frequency, layer_dim, _ in MOE:
        check_family(result, base, tuned, selected, frequency, layer_dim)
    for g, group in enumerate(GROUPS):
        for layer, position in enumerate(MOE_LAYERS):
            p = naive_distribution(list(base.expert_frequency.values[g, layer]))
            q = naive_distribution(list(tuned.expert_frequency.values[g, layer]))
            assert close(result.expert_selection_js.sel(group=group, moe_layer=position), naive_js(p, q))


def test_identical_results_show_no_change():
    base, _ = pair(0)
    result = compare_components(base, base.assign_attrs(model="same"))
    for name in ("isn", "ise", "expert_isn", "shared_isn"):
        assert int(result[f"{name}_gained_total"].sum()) == 0 and int(result[f"{name}_lost_total"].sum()) == 0
        assert np.allclose(result[f"{name}_layer_tv"], 0) and np.allclose(result[f"{name}_layer_emd"], 0)
        assert np.allclose(result[f"{name}_layer_js"], 0)
    assert np.allclose(result.expert_selection_js, 0)
    assert float(abs(result.frequency_delta).max()) == 0


# --- known answers ----------------------------------------------------------------------------

def sizes(values: list[int], layers=DENSE_LAYERS) -> xr.DataArray:
    return xr.DataArray(values, dims=["layer"], coords={"layer": layers})


@pytest.mark.parametrize("base_sizes, tuned_sizes, tv, js, emd", [
    ([4, 0, 0], [0, 0, 4], 1.0, 1.0, 5.0),               # all mass moved from layer 0 to layer 5
    ([3, 1, 0], [6, 2, 0], 0.0, 0.0, 0.0),               # same shape, twice the size
    ([2, 0, 0], [1, 1, 0], 0.5, 0.5 * math.log2(4 / 3) + 0.25 * (math.log2(2 / 3) + 1), 1.0),
    ([0, 0, 0], [1, 1, 0], math.nan, math.nan, math.nan),  # an empty set has no distribution
])
def test_layer_shift_known_answers(base_sizes, tuned_sizes, tv, js, emd):
    shift = layer_shift(sizes(base_sizes), sizes(tuned_sizes), "layer")
    assert close(shift.tv, tv) and close(shift.js, js) and close(shift.emd, emd)


def test_jensen_shannon_known_answers():
    def js(p, q):
        return float(jensen_shannon(xr.DataArray(p, dims=["expert"]), xr.DataArray(q, dims=["expert"]), "expert"))
    assert js([1, 0], [0, 1]) == pytest.approx(1.0)
    assert js([0.2, 0.8], [2, 8]) == pytest.approx(0.0, abs=1e-15)   # normalised before comparing
    assert js([0.5, 0.5], [1, 0]) == pytest.approx(0.25 * math.log2(2 / 3) + 0.25 + 0.5 * math.log2(4 / 3))
    assert math.isnan(js([0, 0], [1, 0]))


def test_top_movers_are_the_largest_changes():
    base, tuned = pair(5, moe=False)
    movers = top_movers(base.frequency, tuned.frequency, 4)
    for g, group in enumerate(GROUPS):
        delta = tuned.frequency.values[g] - base.frequency.values[g]
        expected = sorted(np.ndindex(delta.shape), key=lambda i: -abs(delta[i]))[:4]
        got = [(DENSE_LAYERS.index(row["layer"]), row["neuron"]) for row in movers[group]]
        assert got == expected
        for row, index in zip(movers[group], expected):
            assert row["base"] == pytest.approx(base.frequency.values[g][index])
            assert row["tuned"] == pytest.approx(tuned.frequency.values[g][index])
            assert row["delta"] == pytest.approx(delta[index])


# --- refusals ---------------------------------------------------------------------------------

MISMATCHES = [
    ("architecture", lambda d: d.assign_attrs(architecture="mixtral"), "architecture differs"),
    ("dataset", lambda d: d.assign_attrs(dataset_hash="e" * 64), "dataset hash differs"),
    ("span", lambda d: d.assign_attrs(token_span="response"), "token span differs"),
    ("rule", lambda d: d.assign_attrs(rule="layer_percentile"), "selection rule differs"),
    ("epsilon", lambda d: d.assign_attrs(epsilon=0.02), "epsilon differs"),
    ("grouping", lambda d: d.assign_attrs(group_by="origin"), "grouping differs"),
    ("neurons", lambda d: d.isel(neuron=slice(0, 8)), "neurons per layer differ: base 10, tuned 8"),
    ("layers", lambda d: d.assign_coords(layer=[0, 2, 6]), "dense layers differ"),
    ("layer count", lambda d: d.isel(layer=slice(0, 2)), "dense layers differ: base 3, tuned 2"),
    ("experts", lambda d: d.isel(expert=slice(0, 3)), "experts per layer differ: base 4, tuned 3"),
    ("expert neurons", lambda d: d.isel(expert_neuron=slice(0, 2)), "neurons per expert differ"),
    ("moe layers", lambda d: d.isel(moe_layer=slice(0, 2)), "MoE layers differ"),
    ("groups", lambda d: d.isel(group=[0, 1, 2]), "groups differ"),
    ("families", lambda d: d.drop_vars(["ise", "expert_frequency"]), "components differ"),
]


@pytest.mark.parametrize("name, change, message", MISMATCHES, ids=[m[0] for m in MISMATCHES])
def test_mismatched_components_are_refused(name, change, message):
    base, tuned = pair(0)
    with pytest.raises(ComparisonError, match="cannot compare base 'base-model' with tuned 'tuned-model'") as error:
        compare_components(base, change(tuned))
    assert message in str(error.value)


def test_every_difference_is_named_at_once():
    base, tuned = pair(0)
    with pytest.raises(ComparisonError) as error:
        check_components_compatible(base, tuned.assign_attrs(token_span="content", dataset_hash="f").isel(neuron=[0]))
    assert all(m in str(error.value) for m in ("token span", "dataset hash", "neurons per layer"))


def test_threshold_rule_compares_tau_not_epsilon():
    base, tuned = (d.assign_attrs(rule="threshold") for d in pair(0))
    check_components_compatible(base, tuned.assign_attrs(epsilon=0.5))
    with pytest.raises(ComparisonError, match="tau differs: base 0.5, tuned 0.6"):
        check_components_compatible(base, tuned.assign_attrs(tau=0.6))


def fake_store(moe: bool = False, **attrs) -> xr.Dataset:
    n = 4
    data = {"act_count": (("instruction", "layer", "neuron"), np.zeros((n, 3, 6), np.uint32)),
            "token_count": (("instruction",), np.ones(n, np.uint32))}
    if moe:
        data["expert_count"] = (("instruction", "moe_layer", "expert"), np.zeros((n, 2, 4), np.uint32))
    coords = {"instruction_id": ("instruction", [f"r{i}" for i in range(n)]), "layer": [0, 1, 2]}
    if moe:
        coords["moe_layer"] = [3, 4]
    return xr.Dataset(data, coords=coords, attrs={"model": "m", "architecture": "llama",
                                                  "dataset_hash": "d", "token_span": "prompt", **attrs})


@pytest.mark.parametrize("tuned, message", [
    (fake_store(architecture="mistral"), "architecture differs: base 'llama', tuned 'mistral'"),
    (fake_store(dataset_hash="x"), "dataset hash differs"),
    (fake_store(token_span="content"), "token span differs"),
    (fake_store().isel(neuron=slice(0, 5)), "neurons per layer differ: base 6, tuned 5"),
    (fake_store().isel(layer=slice(0, 2)), "dense layers differ"),
    (fake_store(moe=True), "components differ"),
    (fake_store().assign_coords(instruction_id=("instruction", ["r0", "r1", "r3", "r2"])), "instructions differ"),
])
def test_mismatched_stores_are_refused(tuned, message):
    check_stores_compatible(fake_store(), fake_store())
    with pytest.raises(ComparisonError) as error:
        check_stores_compatible(fake_store(), tuned)
    assert message in str(error.value)


def test_stores_hooked_differently_or_written_before_the_record_are_compatible():
    """The same counts whichever path counted the experts; older stores lack `hooked_modules`."""
    backend = [{"module": "model.layers.3.mlp.experts", "kind": "experts_backend",
                "counts": ["expert_count", "expert_act_count"]}]
    pre_hook = [dict(backend[0], kind="forward_pre_hook")]
    check_stores_compatible(fake_store(moe=True, hooked_modules=backend), fake_store(moe=True, hooked_modules=pre_hook))
    check_stores_compatible(fake_store(moe=True), fake_store(moe=True, hooked_modules=backend))


def test_stores_with_different_expert_counts_are_refused():
    with pytest.raises(ComparisonError, match="experts per layer differ: base 4, tuned 2"):
        check_stores_compatible(fake_store(moe=True), fake_store(moe=True).isel(expert=slice(0, 2)))


# --- the report -------------------------------------------------------------------------------

@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_report_files_and_focus_verdict(tmp_path, moe):
    base, tuned = pair(7, moe=moe)
    summary = write_comparison_report(base, tuned, tmp_path, focus_groups=["CODE", "MATH"], top=3)
    for name, path in summary["files"].items():
        assert Path(path).exists(), name
    assert ("expert_selection.png" in summary["files"]) == moe
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["note"] == summary["note"]
    stored = xr.open_zarr(tmp_path / "comparison.zarr").load()  # what is on disk, against the naive sets
    for selected, frequency, layer_dim, _ in [DENSE] + (MOE if moe else []):
        check_family(stored, base, tuned, selected, frequency, layer_dim)

    turnover = {g: 1 - naive_jaccard(members(base.isn.values, i), members(tuned.isn.values, i))
                for i, g in enumerate(GROUPS)}
    shift = {g: float(np.mean(np.abs(tuned.frequency.values[i] - base.frequency.values[i])))
             for i, g in enumerate(GROUPS)}
    verdict = summary["focus_verdict"]
    assert verdict["focus"] == ["CODE", "MATH"] and verdict["others"] == ["GEN", "QA"]
    for measure, values in (("turnover", turnover), ("mean_abs_delta", shift)):
        focus = (values["CODE"] + values["MATH"]) / 2
        others = (values["GEN"] + values["QA"]) / 2
        assert verdict["measures"][measure]["focus_mean"] == pytest.approx(focus, abs=1e-6)
        assert verdict["measures"][measure]["others_mean"] == pytest.approx(others, abs=1e-6)
        assert verdict["measures"][measure]["difference"] == pytest.approx(focus - others, abs=1e-6)
    # 2 of 4 groups fine-tuned: 6 labelings, p cannot go below 1/6, so the data cannot say yes
    assert verdict["answer"] == "undecided" and "only 6 labelings, so p cannot go below 0.167" in verdict["reason"]
    most = max(turnover, key=turnover.get)
    assert f"Most changed group: {most}" in summary["note"]
    assert "Did the fine-tuned categories (CODE, MATH) move more than the others?" in summary["note"]

    markdown = (tmp_path / "comparison.md").read_text()
    assert "| CODE | " in markdown and "Largest frequency changes" in markdown
    assert ("Expert selection frequencies" in markdown) == moe

    report = tmp_path / "report.md"
    report.write_text("# findings\n")
    link_into_report(report, summary)
    link_into_report(report, summary)  # a rerun replaces the section, it does not repeat it
    assert report.read_text().startswith("# findings\n")
    assert report.read_text().count("## Before and after fine-tuning") == 1
    assert "[comparison.md](comparison.md)" in report.read_text()


def test_no_verdict_when_every_group_was_trained_on(tmp_path):
    base, tuned = pair(1, moe=False)
    summary = write_comparison_report(base, tuned, tmp_path, focus_groups=GROUPS)
    assert summary["focus_verdict"] is None and "fine-tuned categories" not in summary["note"]


# --- model pairs ------------------------------------------------------------------------------

def test_model_pairs_config():
    pairs = load_model_pairs()
    assert set(pairs) == {"llama-2-7b", "mistral-7b", "qwen1.5-moe", "olmoe", "mixtral-8x7b"}
    assert pairs["llama-2-7b"].base == "meta-llama/Llama-2-7b-hf"
    assert pairs["llama-2-7b"].tuned == "meta-llama/Llama-2-7b-chat-hf"
    assert pairs["olmoe"].tuned == "allenai/OLMoE-1B-7B-0924-Instruct" and pairs["olmoe"].moe
    assert not pairs["mistral-7b"].moe
    with pytest.raises(ValueError, match="unknown model pair 'gpt-9'.*llama-2-7b"):
        model_pair("gpt-9")


def test_bad_pairs_file_names_the_pair(tmp_path):
    bad = tmp_path / "pairs.yaml"
    bad.write_text("mine:\n  base: a\n  tuned: b\n  archtecture: llama\n")
    with pytest.raises(ValueError, match="pair 'mine'"):
        load_model_pairs(bad)


# --- the flow and the CLI on real stores ----------------------------------------------------------

@pytest.fixture(scope="module")
def two_stores(tmp_path_factory, tiny_llama_dir, cache_dir) -> tuple[Path, Path, Path]:
    """Counts of the tiny LLaMA, of a perturbed copy, and of a 4-layer model (not comparable)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sparcom.extraction.settings import ExtractionSettings
    from sparcom.extraction.extract import extract_to_store
    from sparcom.curation.starter import starter_set
    from sparcom.core.models import load_model, resolve_model

    root = tmp_path_factory.mktemp("compare-stores")
    records = [r for r in starter_set() if r.category in ("CODE", "MATH", "QA")][::4]
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.model.layers[1].parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    perturbed = root / "perturbed"
    model.save_pretrained(perturbed)
    tokenizer.save_pretrained(perturbed)
    config = LlamaConfig.from_pretrained(tiny_llama_dir, num_hidden_layers=4)
    deeper = root / "deeper"
    LlamaForCausalLM(config).save_pretrained(deeper)
    tokenizer.save_pretrained(deeper)
    stores = []
    for directory in (tiny_llama_dir, perturbed, deeper):
        loaded = load_model(resolve_model(str(directory)), cache_dir, "float32", "cpu")
        stores.append(extract_to_store(loaded, records, root / f"{Path(directory).name}.zarr",
                                       ExtractionSettings()))
    return tuple(stores)


@pytest.mark.slow
def test_compare_flow_on_two_stores(tmp_path, prefect_harness, two_stores, cache_dir):
    from flows.compare import compare_models
    from sparcom.config import PipelineSettings
    from sparcom.identification.settings import IdentificationSettings

    base_store, tuned_store, _ = two_stores
    settings = PipelineSettings(work_dir=tmp_path, cache_dir=cache_dir,
                                identification=IdentificationSettings(epsilon=0.1))
    summary = compare_models(settings, base_store=base_store, tuned_store=tuned_store, focus_groups=["CODE"])
    neurons = summary["families"]["isn"]
    assert summary["groups"] == ["CODE", "MATH", "QA"] and summary["epsilon"] == 0.1
    # only layer 1 was perturbed: layer 0 frequencies are identical, layers 1 and 2 move
    comparison = xr.open_zarr(summary["files"]["comparison.zarr"])
    moved = comparison.frequency_mean_abs_delta.max("group")
    assert float(moved.sel(layer=0)) == 0 and float(moved.sel(layer=1)) > 0 and float(moved.sel(layer=2)) > 0
    assert sum(neurons["churn_per_layer"]) > 0
    assert neurons["per_group"]["mean_abs_delta"]["CODE"] > 0
    assert Path(summary["files"]["comparison.md"]).is_file()


@pytest.mark.slow
def test_cli_compare_stores_and_refusal(tmp_path, prefect_harness, two_stores, cache_dir, monkeypatch):
    from cli.app import app

    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_dir.parent))
    base_store, tuned_store, deeper_store = two_stores
    runner = CliRunner()
    result = runner.invoke(app, ["compare", "--base-store", str(base_store), "--tuned-store", str(tuned_store),
                                 "--epsilon", "0.1", "--work-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "before and after fine-tuning" in result.output and "Jaccard" in result.output
    refused = runner.invoke(app, ["compare", "--base-store", str(base_store), "--tuned-store",
                                  str(deeper_store), "--work-dir", str(tmp_path)])
    assert refused.exit_code != 0
    assert "dense layers differ: base 3, tuned 4" in refused.output
    neither = runner.invoke(app, ["compare", "--base-store", str(base_store), "--work-dir", str(tmp_path)])
    assert neither.exit_code == 2 and "--tuned" in neither.output
    unknown = runner.invoke(app, ["compare", "--pair", "gpt-9", "--work-dir", str(tmp_path)])
    assert unknown.exit_code == 2 and "unknown model pair 'gpt-9'" in unknown.output


@pytest.mark.slow
def test_compare_flow_on_two_models(tmp_path, prefect_harness, two_stores, tiny_llama_dir, cache_dir, sample_records):
    from flows.compare import compare_models
    from sparcom.config import PipelineSettings
    from sparcom.curation.settings import DatasetSettings
    from sparcom.extraction.settings import ModelSettings
    from sparcom.identification.settings import IdentificationSettings

    dataset = tmp_path / "d.jsonl"
    dataset.write_text("".join(r.model_dump_json() + "\n" for r in sample_records))
    perturbed = two_stores[1].parent / "perturbed"
    settings = PipelineSettings(work_dir=tmp_path / "work", cache_dir=cache_dir, dataset=DatasetSettings(path=dataset),
                                identification=IdentificationSettings(epsilon=0.05))
    summary = compare_models(settings, base=ModelSettings(name=str(tiny_llama_dir)),
                             tuned=ModelSettings(name=str(perturbed)), focus_groups=["CODE", "MATH"])
    assert summary["base_model"] == str(tiny_llama_dir) and summary["tuned_model"] == str(perturbed)
    assert summary["groups"] == ["CLS", "CODE", "GEN", "MATH", "QA", "SUM"]
    assert summary["focus_verdict"]["focus"] == ["CODE", "MATH"]
    assert len(list((tmp_path / "work" / "stores").glob("*.zarr"))) == 2
