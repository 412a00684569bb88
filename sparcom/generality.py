"""Generality and uniqueness of component sets across groups (docs/method.md section 4).

- `generality(selected, component_dims, layer_dim)`: from selected[group, *component_dims]:
  general components (in every group's set), unique ones (in exactly one), how many groups hold
  each component, set sizes in total and per layer, the Jaccard matrix between groups, each
  set's distribution over layers and, where there is an `expert` dim, over experts.
- `analyze(components)`: `generality` of every component family in a components dataset, merged
  into one dataset whose names carry the family's name (`neurons_general`, `experts_jaccard`,
  `expert_neurons_unique`, ...). Lazy (Dask) when the components are.
- `family_part(analysis, family)`: one family's variables back under their own names.
- `share(part, whole)`: part / whole, NaN where the whole is empty (shares, Jaccard indices).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from sparcom.identify import FAMILIES, GROUP, Family, families_in

OTHER = "other_group"
EXPERT = "expert"
# The Jaccard matrix costs groups^2 x components multiply-adds; above this (per-instruction sets
# of a large model) it is left out and the analysis says so in its attributes.
JACCARD_MAX_WORK = 2e11


def jaccard_matrix(selected: xr.DataArray, component_dims: list[str]) -> xr.DataArray:
    """|A & B| / |A | B| for every pair of groups; NaN where both sets are empty."""
    members = selected.astype(np.float64)  # exact: counts stay far below 2**53
    other = members.rename({GROUP: OTHER})
    intersection = xr.dot(members, other, dim=component_dims, optimize=True)
    sizes = members.sum(component_dims)
    union = sizes + sizes.rename({GROUP: OTHER}) - intersection
    return share(intersection, union)


def share(part: xr.DataArray, whole: xr.DataArray) -> xr.DataArray:
    """part / whole, NaN where the whole is empty (a share of nothing is undefined, not 0)."""
    return part / whole.where(whole > 0)


def generality(selected: xr.DataArray, component_dims: tuple[str, ...] = ("layer", "neuron"),
               layer_dim: str = "layer") -> xr.Dataset:
    dims = list(component_dims)
    within_layer = [d for d in dims if d != layer_dim]
    membership = selected.sum(GROUP, dtype=np.int64)
    general = membership == selected.sizes[GROUP]
    unique = selected & (membership == 1)
    set_size = selected.sum(dims, dtype=np.int64)
    per_layer = selected.sum(within_layer, dtype=np.int64)
    result = {
        "general": general,
        "unique": unique,
        "membership": membership,
        "set_size": set_size,
        "general_count": general.sum(dims, dtype=np.int64),
        "unique_count": unique.sum(dims, dtype=np.int64),
        "set_size_per_layer": per_layer,
        "general_per_layer": general.sum(within_layer, dtype=np.int64),
        "unique_per_layer": unique.sum(within_layer, dtype=np.int64),
        "layer_distribution": share(per_layer, set_size),
    }
    if EXPERT in dims:
        per_expert = selected.sum([d for d in dims if d != EXPERT], dtype=np.int64)
        result["set_size_per_expert"] = per_expert
        result["expert_distribution"] = share(per_expert, set_size)
        result["set_size_per_layer_expert"] = selected.sum(
            [d for d in dims if d not in (layer_dim, EXPERT)], dtype=np.int64)
    attrs = {}
    if selected.sizes[GROUP] ** 2 * np.prod([selected.sizes[d] for d in dims]) <= JACCARD_MAX_WORK:
        result["jaccard"] = jaccard_matrix(selected, dims)
    else:
        attrs["jaccard_left_out"] = (f"{selected.sizes[GROUP]} groups: the Jaccard matrix would "
                                     f"cost more than {JACCARD_MAX_WORK:.0e} multiply-adds")
    return xr.Dataset(result, attrs=attrs)


def prefix(family: Family) -> str:
    return f"{family.name}_"


def family_part(analysis: xr.Dataset, family: Family) -> xr.Dataset:
    names = [n for n in analysis.data_vars if n.startswith(prefix(family))]
    part = analysis[names].rename({n: n.removeprefix(prefix(family)) for n in names})
    return part.assign_attrs({k.removeprefix(prefix(family)): v for k, v in analysis.attrs.items()
                              if k.startswith(prefix(family))})


def analyzed_families(analysis: xr.Dataset) -> list[Family]:
    return [f for f in FAMILIES if prefix(f) + "set_size" in analysis]


def analyze(components: xr.Dataset) -> xr.Dataset:
    parts = []
    attrs = dict(components.attrs)
    for family in families_in(components, by="selected"):
        selected = components[family.selected].reset_coords(drop=True)
        dims = tuple(d for d in selected.dims if d != GROUP)
        part = generality(selected, dims, family.layer_dim)
        attrs.update({prefix(family) + key: value for key, value in part.attrs.items()})
        parts.append(part.rename({name: prefix(family) + name for name in part.data_vars}))
    return xr.merge(parts, combine_attrs="drop").assign_attrs(attrs)
