"""Generality and uniqueness of component sets across groups (docs/method.md section 4).

- `generality(selected, component_dims, layer_dim)`: from selected[group, *component_dims]:
  general components (in every group's set), unique ones (in exactly one), how many groups hold
  each component, set sizes in total and per layer, the Jaccard matrix between groups, each
  set's distribution over layers and, where there is an `expert` dim, over experts.
- `analyze(components)`: `generality` of every component family in a components dataset, merged
  into one dataset whose names carry the family's name (`neurons_general`, `experts_jaccard`,
  `expert_neurons_unique`, ...). Sets up to IN_MEMORY_BYTES are analysed in memory, larger
  ones lazily (Dask), chunk by chunk. Where identification
  split the groups in halves, also the split-half reliability (`neurons_split_within[group]`,
  `neurons_split_cross[group, other_group]`, `neurons_specificity_gap[group]`, docs/method.md section 4b)
  with, where identification ran the null, the null's `neurons_split_null_q95[group]`,
  `neurons_split_p[group]` and `neurons_split_null_count[group]` (permutations with a gap), and
  where the template's share of the counted tokens is known, `neurons_template_level[group]`:
  set members whose frequency is at or below it (they could owe their place to the template).
- `family_part(analysis, family)`: one family's variables back under their own names.
- `share(part, whole)`: part / whole, NaN where the whole is empty (shares, Jaccard indices).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from sparcom.identification.schema import FAMILIES, GROUP, Family, families_in
from sparcom.identification.split_half import (
    OTHER,
    SPLIT_JACCARD,
    SPLIT_NULL_GAP,
    cross_jaccard,
    null_comparison,
    reliability,
)

EXPERT = "expert"
# The Jaccard matrix costs groups^2 x components multiply-adds; above this (per-instruction sets
# of a large model) it is left out and the analysis says so in its attributes.
JACCARD_MAX_WORK = 2e11
# Sets up to this size (a byte per group and component: categories or origins of any model) are
# analysed in memory, where a task graph over their stored chunks costs more than the work;
# larger ones (per-instruction sets) stay lazy and are analysed chunk by chunk.
IN_MEMORY_BYTES = 2**28


def jaccard_matrix(selected: xr.DataArray, component_dims: list[str]) -> xr.DataArray:
    """|A & B| / |A | B| for every pair of groups; NaN where both sets are empty."""
    return cross_jaccard(selected, selected, component_dims)


def share(part: xr.DataArray, whole: xr.DataArray) -> xr.DataArray:
    """part / whole, NaN where the whole is empty (a share of nothing is undefined, not 0)."""
    return part / whole.where(whole > 0)


def generality(selected: xr.DataArray, component_dims: tuple[str, ...] = ("layer", "neuron"),
               layer_dim: str = "layer") -> xr.Dataset:
    dims = list(component_dims)
    within_layer = [d for d in dims if d != layer_dim]
    # How many groups hold each component, in the smallest type that holds the group count:
    # a component-sized array, written to generality.zarr.
    membership = selected.sum(GROUP, dtype=np.min_scalar_type(selected.sizes[GROUP]))
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
        if selected.nbytes <= IN_MEMORY_BYTES:
            # Read by this process: from the workers the chunks would travel here all the same.
            selected = selected.load(scheduler="synchronous")
        dims = tuple(d for d in selected.dims if d != GROUP)
        part = generality(selected, dims, family.layer_dim)
        if f"{family.name}_{SPLIT_JACCARD}" in components:
            part = part.merge(reliability(components[f"{family.name}_{SPLIT_JACCARD}"]))
            if f"{family.name}_{SPLIT_NULL_GAP}" in components:
                null_gap = components[f"{family.name}_{SPLIT_NULL_GAP}"].load()
                part = part.merge(null_comparison(part.specificity_gap, null_gap))
        if "template_share" in components:
            at_template_level = components[family.frequency] <= components.template_share
            part["template_level"] = (selected & at_template_level.reset_coords(drop=True)).sum(
                dims, dtype=np.int64)
        attrs.update({prefix(family) + key: value for key, value in part.attrs.items()})
        parts.append(part.rename({name: prefix(family) + name for name in part.data_vars}))
    return xr.merge(parts, combine_attrs="drop").assign_attrs(attrs)
