"""Generality and uniqueness of component sets across groups (SPEC section 4).

- `generality(isn)`: from isn[group, layer, neuron]: general components (in every group's set),
  unique ones (in exactly one), set sizes per layer and in total, the Jaccard matrix between
  groups and each set's distribution over layers.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from sparcom.identify import GROUP

OTHER = "other_group"


def jaccard_matrix(isn: xr.DataArray, component_dims: list[str]) -> xr.DataArray:
    """|A & B| / |A | B| for every pair of groups; NaN where both sets are empty."""
    members = isn.astype(np.int64)
    other = members.rename({GROUP: OTHER})
    intersection = xr.dot(members, other, dim=component_dims)
    sizes = members.sum(component_dims)
    union = sizes + sizes.rename({GROUP: OTHER}) - intersection
    return intersection / union.where(union > 0)


def generality(isn: xr.DataArray, component_dims: tuple[str, ...] = ("layer", "neuron")) -> xr.Dataset:
    dims = list(component_dims)
    within_layer = [d for d in dims if d != "layer"]
    membership = isn.sum(GROUP)
    general = membership == isn.sizes[GROUP]
    unique = isn & (membership == 1)
    set_size = isn.sum(dims)
    per_layer = isn.sum(within_layer)
    return xr.Dataset({
        "general": general,
        "unique": unique,
        "set_size": set_size,
        "general_count": general.sum(dims),
        "unique_count": unique.sum(dims),
        "set_size_per_layer": per_layer,
        "general_per_layer": general.sum(within_layer),
        "unique_per_layer": unique.sum(within_layer),
        "layer_distribution": per_layer / set_size.where(set_size > 0),
        "jaccard": jaccard_matrix(isn, dims),
    })
