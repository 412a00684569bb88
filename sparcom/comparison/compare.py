"""Before and after: how the component sets of two checkpoints differ (docs/method.md section 5).

- `check_stores_compatible(base, tuned)`, `check_components_compatible(base, tuned)`: raise a
  `ComparisonError` naming every difference (architecture, layers, neurons, experts, dataset
  hash, token span, groups, selection rule and its parameters) that makes a comparison void.
- `set_changes(base, tuned, layer_dim)`: kept, gained and lost components and the Jaccard index
  of the two sets, per layer and in total.
- `layer_shift(base_sizes, tuned_sizes, layer_dim)`: how far a set's distribution over layers
  moved: total variation, Jensen-Shannon divergence (bits) and earth mover's distance (layers).
- `jensen_shannon(p, q, dim)`: JS divergence in bits of two distributions along `dim`.
- `compare_components(base, tuned)`: all of it for every component family both results hold,
  plus frequency deltas, the change of the general and unique sets and, for MoE, the JS
  divergence of expert selection frequencies per layer. The families are `identify.FAMILIES`.
- `top_movers(base, tuned, n)`: per group, the components whose frequency moved most.
- `load_model_pairs()`: the public base/tuned pairs of `sparcom/data/model_pairs.yaml`.
- `check_sides(base, tuned, base_store, tuned_store)`: each side of a comparison given once,
  as a model or as a count store.
- `comparison_run_dir(work_dir, base_name)`: a new run folder for a standalone comparison.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import xarray as xr
import yaml
from pydantic import BaseModel, ConfigDict

from sparcom.extraction.schema import INSTRUCTION, LAYER, MOE_LAYER
from sparcom.identification.generality import generality, share
from sparcom.identification.rules import parameter_names
from sparcom.identification.schema import FAMILIES, GROUP, Family
from sparcom.identification.schema import families_in as identified_families

PAIRS_FILE = Path(__file__).parent / "model_pairs.yaml"
STATUS_MEANINGS = "absent kept gained lost"  # codes 0..3 of the `<set>_status` variables


class ComparisonError(ValueError):
    """Two results that cannot be compared; the message names what differs."""


# What a size along each dimension means, for error messages.
DIMENSION_MEANINGS = {
    "layer": "dense layers", "neuron": "neurons per layer", "moe_layer": "MoE layers",
    "expert": "experts per layer", "expert_neuron": "neurons per expert",
    "shared_neuron": "shared-expert neurons per layer",
}


def families_in(components: xr.Dataset) -> list[Family]:
    return identified_families(components, by="selected")


def component_dims(selected: xr.DataArray) -> tuple[str, ...]:
    return tuple(d for d in selected.dims if d != GROUP)


def within_layer(selected: xr.DataArray, family: Family) -> list[str]:
    return [d for d in selected.dims if d not in (GROUP, family.layer_dim)]


# --- compatibility ---------------------------------------------------------------------------

def _attribute_differences(base: xr.Dataset, tuned: xr.Dataset, names: dict[str, str]) -> list[str]:
    differences = []
    for name, meaning in names.items():
        if name in base.attrs or name in tuned.attrs:
            ours, theirs = base.attrs.get(name, "(not recorded)"), tuned.attrs.get(name, "(not recorded)")
            if ours != theirs:
                differences.append(f"{meaning} differs: base {ours!r}, tuned {theirs!r}")
    return differences


def _shape_differences(base: xr.Dataset, tuned: xr.Dataset, variables: tuple[str, ...]) -> list[str]:
    differences = []
    ours, theirs = [v for v in variables if v in base], [v for v in variables if v in tuned]
    if ours != theirs:
        differences.append(f"components differ: base has {ours or 'none'}, tuned has {theirs or 'none'}")
    for dim, meaning in DIMENSION_MEANINGS.items():
        if base.sizes.get(dim) != tuned.sizes.get(dim):
            differences.append(f"{meaning} differ: base {base.sizes.get(dim, 0)}, tuned {tuned.sizes.get(dim, 0)}")
        elif dim in (LAYER, MOE_LAYER) and dim in base.coords and dim in tuned.coords \
                and not np.array_equal(base[dim].values, tuned[dim].values):
            differences.append(f"{meaning} differ: base {base[dim].values.tolist()}, "
                               f"tuned {tuned[dim].values.tolist()}")
    return differences


def _refuse(base: xr.Dataset, tuned: xr.Dataset, differences: list[str]) -> None:
    if differences:
        raise ComparisonError(
            f"cannot compare base {base.attrs.get('model', '?')!r} with tuned "
            f"{tuned.attrs.get('model', '?')!r}: " + "; ".join(differences))


def check_stores_compatible(base: xr.Dataset, tuned: xr.Dataset) -> None:
    """Two count stores of one architecture over the same instructions and token span."""
    differences = _attribute_differences(base, tuned, {
        "architecture": "architecture", "dataset_hash": "dataset hash", "token_span": "token span"})
    differences += _shape_differences(base, tuned, tuple(f.count for f in FAMILIES))
    if base.sizes.get(INSTRUCTION) != tuned.sizes.get(INSTRUCTION) or not np.array_equal(
            base.instruction_id.values, tuned.instruction_id.values):
        differences.append("instructions differ (ids or order)")
    _refuse(base, tuned, differences)


def check_components_compatible(base: xr.Dataset, tuned: xr.Dataset) -> None:
    """Two identification results of one architecture, dataset, span, grouping and rule."""
    names = {"architecture": "architecture", "dataset_hash": "dataset hash",
             "token_span": "token span", "group_by": "grouping", "rule": "selection rule"}
    rule = base.attrs.get("rule")
    if rule == tuned.attrs.get("rule"):  # the parameters the rule uses; the others are inert
        names.update({parameter: parameter for parameter in parameter_names(rule)})
    differences = _attribute_differences(base, tuned, names)
    differences += _shape_differences(base, tuned, tuple(f.selected for f in FAMILIES))
    if not np.array_equal(base[GROUP].values, tuned[GROUP].values):
        differences.append(f"groups differ: base {base[GROUP].values.tolist()}, "
                           f"tuned {tuned[GROUP].values.tolist()}")
    _refuse(base, tuned, differences)


# --- measures --------------------------------------------------------------------------------

def set_changes(base: xr.DataArray, tuned: xr.DataArray, layer_dim: str) -> xr.Dataset:
    """Counts per layer (`kept`...) and over all layers (`kept_total`...); Jaccard NaN if both empty."""
    within = [d for d in base.dims if d not in (GROUP, layer_dim)]
    per_layer = xr.Dataset({
        "base_size": base.sum(within), "tuned_size": tuned.sum(within),
        "kept": (base & tuned).sum(within), "gained": (tuned & ~base).sum(within),
        "lost": (base & ~tuned).sum(within)})
    totals = per_layer.sum(layer_dim)
    result = xr.merge([per_layer, totals.rename({name: f"{name}_total" for name in totals})])
    for suffix in ("", "_total"):
        union = result[f"kept{suffix}"] + result[f"gained{suffix}"] + result[f"lost{suffix}"]
        result[f"jaccard{suffix}"] = share(result[f"kept{suffix}"], union)
    return result


def _distribution(values: xr.DataArray, dim: str) -> xr.DataArray:
    return share(values, values.sum(dim))


def jensen_shannon(p: xr.DataArray, q: xr.DataArray, dim: str) -> xr.DataArray:
    """JS divergence in bits (0 = same, 1 = disjoint) after normalising both along `dim`."""
    p, q = _distribution(p.astype(float), dim), _distribution(q.astype(float), dim)
    middle = (p + q) / 2

    def kl_to_middle(x: xr.DataArray) -> xr.DataArray:
        ratio = (x / middle).where(x > 0, 1.0)  # 0 log 0 = 0; where x > 0, middle > 0 too
        return (x * np.log2(ratio)).sum(dim)

    divergence = (kl_to_middle(p) + kl_to_middle(q)) / 2
    return divergence.where(p.notnull().all(dim) & q.notnull().all(dim))


def layer_shift(base_sizes: xr.DataArray, tuned_sizes: xr.DataArray, layer_dim: str) -> xr.Dataset:
    """Distances between the two sets' distributions over layers; NaN where a set is empty.

    tv: total variation, half the L1 distance (0..1); js: Jensen-Shannon divergence in bits
    (0..1); emd: earth mover's distance in layers, the mean distance the set's mass travelled
    along the true layer indices.
    """
    p, q = _distribution(base_sizes.astype(float), layer_dim), _distribution(tuned_sizes.astype(float), layer_dim)
    gaps = xr.DataArray(np.diff(base_sizes[layer_dim].values).astype(float), dims=[layer_dim],
                        coords={layer_dim: base_sizes[layer_dim].values[:-1]})
    cumulative_gap = abs(p.cumsum(layer_dim) - q.cumsum(layer_dim)).isel({layer_dim: slice(None, -1)})
    return xr.Dataset({
        "tv": abs(p - q).sum(layer_dim, skipna=False) / 2,
        "js": jensen_shannon(base_sizes, tuned_sizes, layer_dim),
        "emd": (cumulative_gap * gaps).sum(layer_dim).where(p.notnull().all(layer_dim) & q.notnull().all(layer_dim)),
    })


def membership_status(base: xr.DataArray, tuned: xr.DataArray) -> xr.DataArray:
    """0 absent from both, 1 kept, 2 gained, 3 lost (`STATUS_MEANINGS`)."""
    status = (base & tuned) * 1 + (tuned & ~base) * 2 + (base & ~tuned) * 3
    status = status.astype(np.int8)
    status.attrs = {"flag_values": [0, 1, 2, 3], "flag_meanings": STATUS_MEANINGS}
    return status


def _general_and_unique(selected: xr.DataArray, family: Family) -> tuple[xr.DataArray, xr.DataArray]:
    found = generality(selected, component_dims(selected), family.layer_dim)
    return found.general, found.unique


def _prefixed(dataset: xr.Dataset, prefix: str) -> dict[str, xr.DataArray]:
    return {f"{prefix}_{name}": dataset[name] for name in dataset.data_vars}


def compare_family(base: xr.Dataset, tuned: xr.Dataset, family: Family) -> xr.Dataset:
    """Every per-family figure, variables prefixed with the family's selection variable."""
    name, layer_dim = family.selected, family.layer_dim
    before, after = base[name].astype(bool), tuned[name].astype(bool)
    changes = set_changes(before, after, layer_dim)
    general_before, unique_before = _general_and_unique(before, family)
    general_after, unique_after = _general_and_unique(after, family)
    delta = tuned[family.frequency] - base[family.frequency]
    delta.attrs = {"meaning": "tuned frequency minus base frequency"}
    variables = {
        **_prefixed(changes, name),
        **_prefixed(layer_shift(changes.base_size, changes.tuned_size, layer_dim), f"{name}_layer"),
        **_prefixed(set_changes(general_before, general_after, layer_dim), f"{name}_general"),
        **_prefixed(set_changes(unique_before, unique_after, layer_dim), f"{name}_unique"),
        f"{name}_status": membership_status(before, after),
        f"{family.frequency}_delta": delta,
        f"{family.frequency}_mean_abs_delta": abs(delta).mean(within_layer(delta, family)),
        f"{family.frequency}_max_abs_delta": abs(delta).max(within_layer(delta, family)),
        f"{family.frequency}_mean_abs_delta_total": abs(delta).mean(component_dims(delta)),
    }
    return xr.Dataset(variables)


def compare_components(base: xr.Dataset, tuned: xr.Dataset) -> xr.Dataset:
    """The whole comparison of two identification results (refused if they do not match)."""
    check_components_compatible(base, tuned)
    families = families_in(base)
    if not families:
        raise ComparisonError("neither result holds component sets (isn, ise, expert_isn, shared_isn)")
    parts = [compare_family(base, tuned, family) for family in families]
    if "expert_frequency" in base:
        selection = jensen_shannon(base.expert_frequency, tuned.expert_frequency, "expert")
        selection.attrs = {"meaning": "JS divergence (bits) of the expert selection shares per layer"}
        parts.append(xr.Dataset({"expert_selection_js": selection}))
    parts.append(xr.Dataset({"token_total_base": base.token_total, "token_total_tuned": tuned.token_total}))
    result = xr.merge(parts, combine_attrs="drop")
    shared = ("dataset_hash", "token_span", "group_by", "rule", "epsilon", "tau", "top_rate", "filter_rate",
              "bar_ratio", "architecture")
    result.attrs = {
        **{key: base.attrs[key] for key in shared if key in base.attrs},
        **{f"base_{key}": base.attrs.get(key, "") for key in ("model", "model_fingerprint")},
        **{f"tuned_{key}": tuned.attrs.get(key, "") for key in ("model", "model_fingerprint")},
        "families": [f.selected for f in families],
        "layer_shift": "tv: total variation; js: Jensen-Shannon (bits); emd: earth mover's (layers)",
    }
    return result


def top_movers(base: xr.DataArray, tuned: xr.DataArray, n: int) -> dict[str, list[dict]]:
    """Per group, up to n components with the largest |tuned - base| frequency (ties: first)."""
    delta = tuned - base
    movers = {}
    for group in delta[GROUP].values:
        change = delta.sel({GROUP: group})
        magnitude = np.abs(change.values).ravel()
        order = np.argsort(-magnitude, kind="stable")[:n]
        rows = []
        for flat in order[magnitude[order] > 0]:
            position = dict(zip(change.dims, np.unravel_index(flat, change.shape)))
            where = {dim: change[dim].values[i].item() for dim, i in position.items()}
            rows.append({**where,
                         "base": float(base.sel({GROUP: group}).isel(position)),
                         "tuned": float(tuned.sel({GROUP: group}).isel(position)),
                         "delta": float(change.isel(position))})
        movers[str(group)] = rows
    return movers


# --- public base/tuned pairs -----------------------------------------------------------------

class ModelPair(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str
    tuned: str
    architecture: str
    moe: bool = False
    note: str = ""


def load_model_pairs(path: Path = PAIRS_FILE) -> dict[str, ModelPair]:
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of pair names to {{base, tuned, architecture}}")
    pairs = {}
    for name, entry in raw.items():
        try:
            pairs[str(name)] = ModelPair.model_validate(entry)
        except Exception as error:
            raise ValueError(f"{path}: pair {name!r}: {error}") from None
    return pairs


def model_pair(name: str, path: Path = PAIRS_FILE) -> ModelPair:
    pairs = load_model_pairs(path)
    if name not in pairs:
        raise ValueError(f"unknown model pair {name!r}; {path} lists: {', '.join(sorted(pairs))}")
    return pairs[name]


def check_sides(base: object, tuned: object, base_store: Path | None, tuned_store: Path | None) -> None:
    """Each side a model or a finished count store, one of the two: else a ValueError."""
    if (base is None) == (base_store is None) or (tuned is None) == (tuned_store is None):
        raise ValueError("give the base and the tuned side each as a model or as a store (one of the two)")


def comparison_run_dir(work_dir: Path, base_name: str) -> Path:
    """`<work_dir>/runs/<time>-compare-<base model or store name>`."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(work_dir).resolve() / "runs" / f"{stamp}-compare-{Path(base_name).name.removesuffix('.zarr')}"
