"""Control sets for an ablation: other components of the same number per layer (docs/method.md section 6).

- `overall_frequency(components, family)`: each component's frequency over all instructions of the
  store, exact from the group frequencies and token totals of `components.zarr`.
- `random_control(selected, layer_dim, rng)`: per layer, as many components as the set holds
  there, drawn uniformly from the layer's components outside the set.
- `frequency_matched_control(selected, frequency, layer_dim, rng)`: per layer, for each component
  of the set (taken in a seeded random order, our choice: the method leaves the order open), the
  not-yet-drawn component outside the set whose overall frequency is nearest, ties broken at
  random by the seed.
- `distinct_random_controls(selected, layer_dim)`: how many different random controls exist
  (the product over layers of C(outside, in set)), to refuse more seeds than that.
- `CONTROLS`: the control names and their draws.

Every set is a boolean xarray DataArray over the family's component dims (layer first or not).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import xarray as xr

from sparcom.identification.schema import GROUP, Family


def overall_frequency(components: xr.Dataset, family: Family) -> xr.DataArray:
    tokens = components.token_total.astype(np.float64)
    return (components[family.frequency] * tokens).sum(GROUP) / tokens.sum(GROUP)


def _per_layer(selected: xr.DataArray, layer_dim: str) -> xr.DataArray:
    """[layer, component] with the other component dims stacked into one."""
    others = [d for d in selected.dims if d != layer_dim]
    return selected.stack(component=others).transpose(layer_dim, "component")


def _unstacked(flat: np.ndarray, like: xr.DataArray, layer_dim: str) -> xr.DataArray:
    stacked = _per_layer(like, layer_dim)
    return stacked.copy(data=flat).unstack("component").transpose(*like.dims)


def random_control(selected: xr.DataArray, layer_dim: str, rng: np.random.Generator) -> xr.DataArray:
    members = _per_layer(selected, layer_dim).values
    drawn = np.zeros_like(members)
    for layer, row in enumerate(members):
        outside = np.flatnonzero(~row)
        drawn[layer, rng.choice(outside, size=int(row.sum()), replace=False)] = True
    return _unstacked(drawn, selected, layer_dim)


def frequency_matched_control(selected: xr.DataArray, frequency: xr.DataArray, layer_dim: str,
                              rng: np.random.Generator) -> xr.DataArray:
    members = _per_layer(selected, layer_dim).values
    values = _per_layer(frequency.transpose(*selected.dims), layer_dim).values
    drawn = np.zeros_like(members)
    for layer, row in enumerate(members):
        outside = np.flatnonzero(~row)
        available = np.ones(len(outside), dtype=bool)
        for component in rng.permutation(np.flatnonzero(row)):
            distance = np.where(available, np.abs(values[layer, outside] - values[layer, component]), np.inf)
            nearest = np.flatnonzero(distance == distance.min())
            pick = nearest[rng.integers(len(nearest))] if len(nearest) > 1 else nearest[0]
            available[pick] = False
            drawn[layer, outside[pick]] = True
    return _unstacked(drawn, selected, layer_dim)


def distinct_random_controls(selected: xr.DataArray, layer_dim: str) -> int:
    """C(outside, inside) multiplied over layers (0 where a layer's set is larger than the rest)."""
    total = 1
    for row in _per_layer(selected, layer_dim).values:
        inside = int(row.sum())
        total = min(total * math.comb(len(row) - inside, inside), 10**18)  # enough to compare with seeds
    return total


ControlDraw = Callable[[xr.DataArray, xr.DataArray, str, np.random.Generator], xr.DataArray]
CONTROLS: dict[str, ControlDraw] = {
    "random": lambda selected, frequency, layer_dim, rng: random_control(selected, layer_dim, rng),
    "frequency_matched": frequency_matched_control,
}
