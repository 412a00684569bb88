"""Instruction-specific neurons: frequencies per group and the selection rules (SPEC section 2).

- `group_frequencies(store, by)`: frequency[group, layer, neuron] = summed counts / summed tokens,
  exact for any grouping (category, origin, instruction).
- `select(frequency, rule, epsilon, tau)`: the boolean ISN sets, isn[group, layer, neuron].
  global_percentile: per group, keep p >= the m-th largest of all layers' frequencies,
                     m = max(1, ceil(epsilon * N - 1e-9)), ties included (the paper's rule);
  layer_percentile:  the same within each layer;
  threshold:         p >= tau.
  A group (or, per layer, a layer) whose frequencies are all zero selects nothing.
- `identify(store, settings)`: both, with the rule recorded in the attributes.
- `identify_store(store_path, settings, out_dir)`: the stage: writes `components.zarr`.
"""

from __future__ import annotations

import math
from pathlib import Path

import dask
import numpy as np
import xarray as xr

from sparcom.config import IdentificationSettings
from sparcom.store import open_store, save_zarr

GROUP = "group"
EPSILON_TOLERANCE = 1e-9


def group_frequencies(store: xr.Dataset, by: str = "category") -> xr.Dataset:
    """frequency and token totals per group; `by` is a coordinate along instruction."""
    key = "instruction_id" if by == "instruction" else by
    labels = store[key]
    counts = store.act_count.astype(np.uint64).groupby(labels).sum("instruction")
    tokens = store.token_count.astype(np.uint64).groupby(labels).sum("instruction")
    counts, tokens = (x.rename({key: GROUP}) for x in dask.compute(counts, tokens))
    frequency = (counts / tokens.where(tokens > 0)).fillna(0.0)
    return xr.Dataset({"frequency": frequency, "token_total": tokens})


def top_fraction_threshold(values: np.ndarray, epsilon: float) -> float:
    """The m-th largest value of `values` (flattened), m = max(1, ceil(epsilon * N - 1e-9))."""
    flat = np.ravel(values)
    m = max(1, math.ceil(epsilon * flat.size - EPSILON_TOLERANCE))
    return float(np.partition(flat, flat.size - m)[flat.size - m])


def _threshold_over(frequency: xr.DataArray, dims: list[str], epsilon: float) -> xr.DataArray:
    return xr.apply_ufunc(
        lambda block: np.apply_along_axis(top_fraction_threshold, -1,
                                          block.reshape(*block.shape[:-len(dims)], -1), epsilon),
        frequency, input_core_dims=[dims], vectorize=False)


def select(frequency: xr.DataArray, rule: str, epsilon: float = 0.01, tau: float = 0.5) -> xr.Dataset:
    if rule == "global_percentile":
        dims = ["layer", "neuron"]
    elif rule == "layer_percentile":
        dims = ["neuron"]
    elif rule == "threshold":
        threshold = xr.full_like(frequency.isel(layer=0, neuron=0, drop=True), tau, dtype=float)
        return xr.Dataset({"isn": frequency >= tau, "threshold": threshold})
    else:
        raise ValueError(f"unknown selection rule {rule!r}")
    threshold = _threshold_over(frequency, dims, epsilon)
    anything_active = frequency.max(dims) > 0
    return xr.Dataset({"isn": (frequency >= threshold) & anything_active, "threshold": threshold})


def identify(store: xr.Dataset, settings: IdentificationSettings) -> xr.Dataset:
    frequencies = group_frequencies(store, settings.group_by)
    selected = select(frequencies.frequency, settings.rule, settings.epsilon, settings.tau)
    result = xr.merge([frequencies, selected])
    result.attrs = {
        **{k: store.attrs[k] for k in ("model", "model_fingerprint", "dataset_hash", "token_span")
           if k in store.attrs},
        "group_by": settings.group_by,
        "rule": settings.rule,
        "epsilon": settings.epsilon,
        "tau": settings.tau,
    }
    return result


def identify_store(store_path: Path, settings: IdentificationSettings, out_dir: Path) -> Path:
    components = identify(open_store(store_path), settings)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return save_zarr(components, Path(out_dir) / "components.zarr")
