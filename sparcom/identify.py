"""Instruction-specific components: frequencies per group and the selection rules (SPEC 2, 3).

- `FAMILIES`: the component families a store may hold (dense neurons, routed experts, neurons of
  routed experts, neurons of shared experts) and the names of their outputs (naming contract).
- `group_frequencies(store, by)`: per family, frequency[group, ...] = summed counts / summed
  tokens, exact for any grouping (category, origin, instruction). Lazy (Dask): per-group sums
  contract a one-hot group matrix with the counts one chunk at a time, so memory stays bounded.
  Each block is checked to lie in [0, 1] as it is computed (a count above its token count is
  a damaged or inconsistent store, a StoreError).
- `top_fraction_threshold(values, epsilon)`: the m-th largest value, m = max(1, ceil(eps*N - 1e-9)).
- `select(frequency, rule, epsilon, tau, layer_dim)`: the boolean sets and their thresholds.
  global_percentile: per group, keep p >= the m-th largest of all layers' frequencies, ties
                     included (the paper's rule); layer_percentile: the same within each layer;
  threshold:         p >= tau.
  A group (or, per layer, a layer) whose frequencies are all zero selects nothing.
- `identify(store, settings)`: every family, rule and store provenance in the attributes (lazy).
- `identify_store(store_path, settings, out_dir)`: the stage: writes `components.zarr` chunk by
  chunk on the current Dask scheduler (see `sparcom.cluster`); frequencies first, then the
  selection from the written frequencies, so no step holds more than one group's components.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from sparcom.config import IdentificationSettings
from sparcom.outputs import building, claimed
from sparcom.store import StoreError, open_store

GROUP = "group"
INSTRUCTION = "instruction"
EPSILON_TOLERANCE = 1e-9
# Selection reads whole groups (all components of a group, or of a group's layer) in blocks of
# about this size.
SELECTION_BLOCK_BYTES = 64 * 2**20
RUN_KIND = "run"  # the output marker of run folders: components, analysis, report
PROVENANCE = ("model", "model_fingerprint", "dataset_hash", "token_span")


@dataclass(frozen=True)
class Family:
    """One kind of component: the store's count variable and the names of its outputs."""
    name: str          # used in reports and file names
    count: str
    frequency: str
    selected: str
    threshold: str
    layer_dim: str

    def component_dims(self, store: xr.Dataset) -> list[str]:
        return [d for d in store[self.count].dims if d != INSTRUCTION]


FAMILIES = (
    Family("neurons", "act_count", "frequency", "isn", "threshold", "layer"),
    Family("experts", "expert_count", "expert_frequency", "ise", "expert_threshold", "moe_layer"),
    Family("expert_neurons", "expert_act_count", "expert_neuron_frequency", "expert_isn",
           "expert_neuron_threshold", "moe_layer"),
    Family("shared_neurons", "shared_act_count", "shared_frequency", "shared_isn",
           "shared_threshold", "moe_layer"),
)


def families_in(dataset: xr.Dataset, by: str = "count") -> list[Family]:
    """The families whose variable `by` (count, frequency or selected) the dataset holds."""
    return [f for f in FAMILIES if getattr(f, by) in dataset]


def _group_labels(store: xr.Dataset, by: str) -> np.ndarray:
    key = "instruction_id" if by == INSTRUCTION else by
    if key not in store.coords:
        raise ValueError(f"cannot group by {by!r}: the store has no {key!r} coordinate along instruction")
    labels = np.array([str(label) for label in store[key].values.tolist()], dtype=str)
    if by == INSTRUCTION and len(np.unique(labels)) < len(labels):
        raise ValueError("cannot group by instruction: instruction_id values repeat")
    return labels


def group_sums(counts: xr.DataArray, labels: np.ndarray) -> xr.DataArray:
    """Summed counts per group (groups sorted), exact: float64 holds every integer below 2**53.

    A one-hot matrix one_hot[instruction, group], chunked like the counts, is contracted with
    them; with Dask each chunk gives a partial sum per group and the partials are added in a
    tree, so memory is a few chunks whatever the store's size."""
    groups = np.unique(labels)
    one_hot = xr.DataArray((labels[:, None] == groups[None, :]).astype(np.float64),
                           dims=(INSTRUCTION, GROUP), coords={GROUP: groups.astype(object)})
    if counts.chunks:
        one_hot = one_hot.chunk({INSTRUCTION: counts.chunksizes[INSTRUCTION], GROUP: -1})
    return xr.dot(one_hot, _plain(counts).astype(np.float64), dim=INSTRUCTION, optimize=True)


def _per_instruction(counts: xr.DataArray, labels: np.ndarray) -> xr.DataArray:
    """The counts themselves, one group per instruction (no sum, no copy: still chunk-wise)."""
    return _plain(counts).astype(np.float64).rename({INSTRUCTION: GROUP}).assign_coords(
        {GROUP: labels.astype(object)})


def _plain(counts: xr.DataArray) -> xr.DataArray:
    return counts.drop_vars([c for c in counts.coords if INSTRUCTION in counts[c].dims])


def group_frequencies(store: xr.Dataset, by: str = "category") -> xr.Dataset:
    """token_total[group] and, per family in the store, frequency[group, ...] (lazy)."""
    labels = _group_labels(store, by)
    sums = _per_instruction if by == INSTRUCTION else group_sums
    token_total = sums(store.token_count, labels).compute()
    result = xr.Dataset({"token_total": token_total.astype(np.uint64)})
    denominator = token_total.where(token_total > 0)
    for family in families_in(store):
        frequency = _in_unit_interval((sums(store[family.count], labels) / denominator).fillna(0.0),
                                      family.frequency)
        result[family.frequency] = frequency.transpose(GROUP, *family.component_dims(store))
    if by == INSTRUCTION:
        result = result.assign_coords({c: (GROUP, store[c].values) for c in ("category", "origin")
                                       if c in store.coords})
    return result


def _in_unit_interval(frequency: xr.DataArray, name: str) -> xr.DataArray:
    def check(block: np.ndarray) -> np.ndarray:
        if block.size and not (block.min() >= 0 and block.max() <= 1):
            raise StoreError(f"{name}: frequencies outside [0, 1] (from {block.min():.3g} to {block.max():.3g}): "
                             "counts exceed token counts, the store is inconsistent")
        return block

    if frequency.chunks:
        return frequency.copy(data=frequency.data.map_blocks(check, dtype=frequency.dtype))
    return frequency.copy(data=check(frequency.values))


def top_fraction_threshold(values: np.ndarray, epsilon: float) -> float:
    """The m-th largest value of `values` (flattened), m = max(1, ceil(epsilon * N - 1e-9))."""
    return float(_row_thresholds(np.reshape(values, (1, -1)), epsilon)[0])


def _row_thresholds(rows: np.ndarray, epsilon: float) -> np.ndarray:
    n = rows.shape[-1]
    m = max(1, math.ceil(epsilon * n - EPSILON_TOLERANCE))
    return np.partition(rows, n - m, axis=-1)[..., n - m]


def _select_block(block: np.ndarray, n_core: int, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """Selection within every run of the last `n_core` axes of a block: (selected, threshold)."""
    leading = block.shape[:block.ndim - n_core]
    rows = block.reshape(*leading, -1)
    threshold = _row_thresholds(rows, epsilon)
    selected = (rows >= threshold[..., None]) & (rows.max(axis=-1, initial=0.0) > 0)[..., None]
    return selected.reshape(block.shape), threshold


def _whole_along(frequency: xr.DataArray, core: list[str]) -> xr.DataArray:
    """Rechunk so each block holds whole runs of the core dims, about SELECTION_BLOCK_BYTES."""
    if not frequency.chunks:
        return frequency
    run_bytes = frequency.dtype.itemsize * math.prod(frequency.sizes[d] for d in core)
    leading = [d for d in frequency.dims if d not in core]
    runs_per_block = max(1, SELECTION_BLOCK_BYTES // run_bytes)
    chunks = {d: -1 for d in core}
    for dim in reversed(leading):  # fill the innermost leading dims first
        chunks[dim] = min(frequency.sizes[dim], runs_per_block)
        runs_per_block = max(1, runs_per_block // frequency.sizes[dim])
    return frequency.chunk(chunks)


def select(frequency: xr.DataArray, rule: str, epsilon: float = 0.01, tau: float = 0.5,
           layer_dim: str = "layer") -> xr.Dataset:
    """`selected` (boolean, like `frequency`) and `threshold` (per group; per group and layer
    for layer_percentile). Lazy when `frequency` is."""
    component_dims = [d for d in frequency.dims if d != GROUP]
    if rule == "threshold":
        first = frequency[{d: 0 for d in component_dims}].drop_vars(component_dims, errors="ignore")
        return xr.Dataset({"selected": frequency >= tau,
                           "threshold": xr.full_like(first, tau, dtype=np.float64)})
    if rule == "global_percentile":
        core = component_dims
    elif rule == "layer_percentile":
        core = [d for d in component_dims if d != layer_dim]
    else:
        raise ValueError(f"unknown selection rule {rule!r}")
    selected, threshold = xr.apply_ufunc(
        _select_block, _whole_along(frequency, core), kwargs={"n_core": len(core), "epsilon": epsilon},
        input_core_dims=[core], output_core_dims=[core, []], dask="parallelized",
        output_dtypes=[bool, np.float64])
    return xr.Dataset({"selected": selected.transpose(*frequency.dims), "threshold": threshold})


def _selection(frequencies: xr.Dataset, settings: IdentificationSettings) -> xr.Dataset:
    result = xr.Dataset()
    for family in families_in(frequencies, by="frequency"):
        chosen = select(frequencies[family.frequency], settings.rule, settings.epsilon, settings.tau,
                        family.layer_dim)
        result[family.selected] = chosen.selected
        result[family.threshold] = chosen.threshold
    return result.reset_coords(drop=True)  # leave the non-index coordinates where they are


def _attrs(store: xr.Dataset, settings: IdentificationSettings) -> dict:
    return {
        **{k: store.attrs[k] for k in PROVENANCE if k in store.attrs},
        "group_by": settings.group_by,
        "rule": settings.rule,
        "epsilon": settings.epsilon,
        "tau": settings.tau,
    }


def _check_store(store: xr.Dataset, where: object) -> None:
    if not families_in(store):
        raise ValueError(f"{where}: no count variable ({', '.join(f.count for f in FAMILIES)})")
    if "token_count" not in store:
        raise ValueError(f"{where}: no token_count variable")


def identify(store: xr.Dataset, settings: IdentificationSettings) -> xr.Dataset:
    """Frequencies, sets and thresholds of every family in the store (lazy when it is)."""
    _check_store(store, "store")
    frequencies = group_frequencies(store, settings.group_by)
    result = xr.merge([frequencies, _selection(frequencies, settings)])
    result.attrs = _attrs(store, settings)
    return result


def _write_zarr(dataset: xr.Dataset, path: Path, mode: str) -> None:
    """Write (chunk by chunk when lazy) without consolidating: `identify_store` consolidates once.

    Zarr needs equal chunks but the last along each dim; Dask's contractions can leave uneven
    ones (small shards, layers split unevenly), so each variable is rechunked to its largest."""
    for variable in dataset.variables.values():
        variable.encoding.pop("chunks", None)
        variable.encoding.pop("preferred_chunks", None)
    dataset = dataset.assign({name: variable.chunk(dict(zip(variable.dims, map(max, variable.chunks))))
                              for name, variable in dataset.data_vars.items() if variable.chunks})
    dataset.to_zarr(path, mode=mode, zarr_format=3, consolidated=False)


def identify_store(store_path: Path, settings: IdentificationSettings, out_dir: Path) -> Path:
    """Write `out_dir/components.zarr`; computes on the current Dask scheduler. The store is
    verified first; `out_dir` must be new, empty or an earlier run folder (`sparcom.outputs`)."""
    store = open_store(store_path)
    _check_store(store, store_path)
    target = Path(out_dir) / "components.zarr"
    with claimed(out_dir, RUN_KIND), building(target, "components") as path:
        frequencies = group_frequencies(store, settings.group_by)
        frequencies.attrs = _attrs(store, settings)
        _write_zarr(frequencies, path, mode="w")
        written = xr.open_zarr(path, consolidated=False)
        _write_zarr(_selection(written, settings).assign_attrs(written.attrs), path, mode="a")
        with warnings.catch_warnings():  # zarr warns that the v3 spec has not adopted consolidation yet
            warnings.filterwarnings("ignore", "Consolidated metadata", category=UserWarning)
            warnings.filterwarnings("ignore", "Object at .sparcom-output", category=UserWarning)
            zarr.consolidate_metadata(path)
    return target
