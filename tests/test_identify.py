"""Selection rules, stored components and generality analysis against plain NumPy, on constructed
dense and MoE stores written to Zarr in the store contract's layout (several chunks per dim)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from sparcom.identification.settings import IdentificationSettings
from sparcom.identification.generality import analyze, family_part, generality
from sparcom.identification.identify import group_frequencies, identify, identify_store
from sparcom.identification.rules import select, top_fraction_threshold
from sparcom.identification.schema import FAMILIES
from sparcom.extraction.store import seal_store
from sparcom.identification.report import report_generality

RULES = ("global_percentile", "layer_percentile", "threshold")


def make_store(act_count: np.ndarray, token_count: np.ndarray, categories: list[str]) -> xr.Dataset:
    n = len(categories)
    return xr.Dataset(
        {"act_count": (("instruction", "layer", "neuron"), act_count.astype(np.uint32)),
         "token_count": (("instruction",), token_count.astype(np.uint32))},
        coords={"instruction_id": ("instruction", [f"i{k}" for k in range(n)]),
                "category": ("instruction", categories),
                "origin": ("instruction", ["ai", "human"] * (n // 2) + ["ai"] * (n % 2)),
                "layer": np.arange(act_count.shape[1])})


def moe_store(seed: int, categories: list[str], dense_layers: int = 2, moe_layers: int = 3,
              experts: int = 4, expert_neurons: int = 5, shared_neurons: int = 6) -> xr.Dataset:
    """A DeepSeek-style store: dense layers first (dim `layer`), then MoE layers (`moe_layer`
    holds their true indices); without dense layers, a Mixtral-style one."""
    rng = np.random.default_rng(seed)
    n = len(categories)
    tokens = rng.integers(4, 30, n)
    routed = rng.integers(0, 7, (n, moe_layers, experts)).clip(max=tokens[:, None, None])
    variables = {
        "token_count": (("instruction",), tokens),
        "expert_count": (("instruction", "moe_layer", "expert"), routed),
        "expert_act_count": (("instruction", "moe_layer", "expert", "expert_neuron"),
                             rng.integers(0, 7, (n, moe_layers, experts, expert_neurons)).clip(max=routed[..., None])),
        "shared_act_count": (("instruction", "moe_layer", "shared_neuron"),
                             rng.integers(0, 7, (n, moe_layers, shared_neurons)).clip(max=tokens[:, None, None])),
    }
    coords = {"moe_layer": np.arange(dense_layers, dense_layers + moe_layers, dtype=np.int32)}
    if dense_layers:
        variables["act_count"] = (("instruction", "layer", "neuron"),
                                  rng.integers(0, 7, (n, dense_layers, 8)).clip(max=tokens[:, None, None]))
        coords["layer"] = np.arange(dense_layers, dtype=np.int32)
    store = xr.Dataset({k: (dims, np.asarray(v, dtype=np.uint32)) for k, (dims, v) in variables.items()},
                       coords={"instruction_id": ("instruction", [f"i{k}" for k in range(n)]),
                               "category": ("instruction", categories),
                               "origin": ("instruction", ["ai", "human"] * (n // 2) + ["ai"] * (n % 2)),
                               **coords})
    return store


def write_store(store: xr.Dataset, path: Path, instruction_chunk: int = 3) -> Path:
    """The store as extraction leaves it: Zarr v3, chunked along instruction and layer, complete."""
    chunk = {"instruction": instruction_chunk, "layer": 1, "moe_layer": 2}
    encoding = {name: {"chunks": tuple(min(chunk.get(d, store.sizes[d]), store.sizes[d]) for d in var.dims)}
                for name, var in store.data_vars.items()}
    coords = {c: ("instruction", np.array(store[c].values, dtype=object))
              for c in ("instruction_id", "category", "origin")}
    attrs = {"model": "tiny-test", "model_fingerprint": "f" * 64, "dataset_hash": "d" * 64,
             "token_span": "prompt", "sparcom_status": "complete"}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Consolidated metadata", category=UserWarning)
        store.assign_coords(coords).assign_attrs(attrs).to_zarr(
            path, mode="w", zarr_format=3, consolidated=True, encoding=encoding)
    seal_store(path)
    return path


# --- plain NumPy references ------------------------------------------------------------------

def naive_frequency(counts: np.ndarray, tokens: np.ndarray, rows: np.ndarray) -> np.ndarray:
    total = int(tokens[rows].sum())
    summed = counts[rows].astype(np.int64).sum(0)
    return summed / total if total else np.zeros(summed.shape)


def naive_global_selection(frequency: np.ndarray, epsilon: float) -> np.ndarray:
    """Sort descending, take the m-th value, keep everything at or above it that is not zero."""
    flat = sorted(frequency.ravel().tolist(), reverse=True)
    m = max(1, math.ceil(epsilon * len(flat) - 1e-9))
    return (frequency >= flat[m - 1]) & (frequency > 0)


def naive_selection(frequency: np.ndarray, rule: str, epsilon: float, tau: float) -> np.ndarray:
    """frequency[layer, ...] of one group -> its set under the rule."""
    if rule == "threshold":
        return frequency >= tau
    if rule == "layer_percentile":
        return np.stack([naive_global_selection(layer, epsilon) for layer in frequency])
    return naive_global_selection(frequency, epsilon)


def group_rows(store: xr.Dataset, by: str) -> dict[str, np.ndarray]:
    key = "instruction_id" if by == "instruction" else by
    labels = np.array(store[key].values.tolist(), dtype=str)
    return {g: labels == g for g in sorted(set(labels.tolist()))}


def assert_components_match(components: xr.Dataset, store: xr.Dataset, settings: IdentificationSettings):
    rows = group_rows(store, settings.group_by)
    tokens = store.token_count.values
    # groups are sorted labels; per instruction they keep the store's order
    expected_groups = store.instruction_id.values.tolist() if settings.group_by == "instruction" else list(rows)
    assert [str(g) for g in components.group.values] == [str(g) for g in expected_groups]
    checked = 0
    for family in FAMILIES:
        if family.count not in store:
            assert family.frequency not in components and family.selected not in components
            continue
        counts = store[family.count].values
        for group, members in rows.items():
            expected = naive_frequency(counts, tokens, members)
            got = components[family.frequency].sel(group=group).values
            np.testing.assert_array_equal(got, expected, err_msg=f"{family.frequency} {group}")
            np.testing.assert_array_equal(
                components[family.selected].sel(group=group).values,
                naive_selection(expected, settings.rule, settings.epsilon, settings.tau),
                err_msg=f"{family.selected} {group} {settings.rule}")
            assert int(components.token_total.sel(group=group)) == int(tokens[members].sum())
            checked += 1
        if settings.rule == "global_percentile":
            for group, members in rows.items():
                flat = np.sort(naive_frequency(counts, tokens, members).ravel())[::-1]
                m = max(1, math.ceil(settings.epsilon * flat.size - 1e-9))
                assert float(components[family.threshold].sel(group=group)) == flat[m - 1]
    assert checked > 0


# --- fixtures ----------------------------------------------------------------------------------

CATEGORIES = ["CLS", "MATH", "QA", "CLS", "MATH", "QA", "CLS", "SUM", "CODE", "QA", "CLS"]


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

def naive_generality(sets: dict[str, set]) -> dict:
    groups = list(sets)
    everything = set().union(*sets.values())
    return {
        "general": {c for c in everything if all(c in sets[g] for g in groups)},
        "unique": {g: sets[g] - set().union(*(sets[o] for o in groups if o != g)) for g in groups},
        "jaccard": {(a, b): (len(sets[a] & sets[b]) / len(sets[a] | sets[b]) if sets[a] | sets[b] else None)
                    for a in groups for b in groups},
    }


def assert_summary_matches_sets(summary: dict, components: xr.Dataset) -> None:
    """Every family's set sizes, general and unique counts and Jaccard indices in a report summary
    against set arithmetic on the selected components."""
    groups = [str(g) for g in components.group.values]
    for family in FAMILIES:
        if family.selected not in components:
            continue
        sets = {g: {tuple(ix) for ix in np.argwhere(components[family.selected].sel(group=g).values)}
                for g in groups}
        naive = naive_generality(sets)
        reported = summary["families"][family.name]
        assert reported["set_size"] == {g: len(sets[g]) for g in groups}
        assert reported["general_count"] == len(naive["general"])
        assert reported["unique_count"] == {g: len(naive["unique"][g]) for g in groups}
        for (a, b), value in naive["jaccard"].items():
            assert reported["jaccard"][a][b] == (None if value is None else round(value, 4))


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
    store = moe_store(23, CATEGORIES, experts=6)
    settings = IdentificationSettings(epsilon=0.15)
    components_path = identify_store(write_store(store, tmp_path / "s.zarr"), settings, tmp_path / "out")
    summary = report_generality(components_path, tmp_path / "out")
    components = xr.open_zarr(components_path).load()
    stored = xr.open_zarr(tmp_path / "out" / "generality.zarr").load()
    groups = summary["groups"]
    assert groups == ["CLS", "CODE", "MATH", "QA", "SUM"]
    assert set(summary["families"]) == {"neurons", "experts", "expert_neurons", "shared_neurons"}
    saved = json.loads(Path(summary["files"]["summary.json"]).read_text())

    for family in FAMILIES:
        selected = components[family.selected]
        dims = [d for d in selected.dims if d != "group"]
        sets = {g: {tuple(ix) for ix in np.argwhere(selected.sel(group=g).values)} for g in groups}
        naive = naive_generality(sets)
        part = family_part(stored, family)
        for reported in (summary["families"][family.name], saved["families"][family.name]):  # returned, on disk
            assert reported["general_count"] == len(naive["general"])
            assert reported["unique_count"] == {g: len(naive["unique"][g]) for g in groups}
            assert reported["set_size"] == {g: len(sets[g]) for g in groups}
            for (a, b), value in naive["jaccard"].items():
                assert reported["jaccard"][a][b] == (None if value is None else round(value, 4))
        reported = summary["families"][family.name]
        layer_axis = dims.index(family.layer_dim)
        for g in groups:
            per_layer = np.bincount([c[layer_axis] for c in sets[g]], minlength=selected.sizes[family.layer_dim])
            assert reported["set_size_per_layer"][g] == per_layer.tolist()
            unique_mask = np.zeros(selected.sel(group=g).shape, bool)
            for c in naive["unique"][g]:
                unique_mask[c] = True
            np.testing.assert_array_equal(part.unique.sel(group=g).values, unique_mask)
            if "expert" in dims:
                expert_axis = dims.index("expert")
                per_expert = np.bincount([c[expert_axis] for c in sets[g]], minlength=selected.sizes["expert"])
                assert reported["set_size_per_expert"][g] == per_expert.tolist()
                if sets[g]:
                    np.testing.assert_allclose(part.expert_distribution.sel(group=g).values, per_expert / len(sets[g]))
        general_mask = np.zeros(selected.shape[1:], bool)
        for c in naive["general"]:
            general_mask[c] = True
        np.testing.assert_array_equal(part.general.values, general_mask)

    files = summary["files"]
    for name in ("report.md", "summary.json", "jaccard.png", "layers.png", "experts.png"):
        assert Path(files[name]).is_file(), name
    expert_sets = {g: {tuple(ix) for ix in np.argwhere(components.ise.sel(group=g).values)} for g in groups}
    sets_table = pd.read_parquet(files["experts_sets.parquet"]).set_index("group")
    assert sets_table.set_size.to_dict() == {g: len(expert_sets[g]) for g in groups}
    jaccard_table = pd.read_parquet(files["expert_neurons_jaccard.parquet"])
    assert len(jaccard_table) == len(groups) ** 2
    report = Path(files["report.md"]).read_text()
    for heading in ("General neurons", "General experts", "General expert neurons", "Distribution over experts"):
        assert heading in report


def test_analysis_leaves_out_an_unaffordable_jaccard_matrix(monkeypatch):
    import sparcom.identification.generality

    monkeypatch.setattr(sparcom.identification.generality, "JACCARD_MAX_WORK", 10)
    isn = xr.DataArray(np.ones((3, 2, 2), bool), dims=("group", "layer", "neuron"),
                       coords={"group": ["a", "b", "c"]})
    result = analyze(xr.Dataset({"isn": isn}))
    assert "neurons_jaccard" not in result and "3 groups" in result.attrs["neurons_jaccard_left_out"]
    assert int(result.neurons_general_count) == 4
