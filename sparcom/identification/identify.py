"""Instruction-specific components: frequencies per group, the sets, their split-half reliability
(docs/method.md sections 2, 3, 4a, 4b).

- The component families and the names of their outputs are `sparcom.identification.schema`.
- `group_frequencies(store, by)`: per family, frequency[group, ...] = summed counts / summed
  tokens, exact for any grouping (category, origin, instruction). Lazy (Dask): per-group sums
  contract each group's instructions with the counts one run of chunks at a time, so memory
  stays bounded.
  Frequencies are checked to lie in [0, 1] as they are computed (a count above its token count
  is a damaged or inconsistent store: a StoreError).
- `one_pass_sums(store, labels, in_half_a)`: every sum identification needs, from one read of
  the counts: per group, and per split-half seed each group's half A (half B is the rest).
- `open_attribution(settings, store, store_path)`: the attribution store (ATTR.zarr) an attribution
  rule selects from, checked against the count store (same instructions, same model, every family);
  None for the other rules. `estimate_sums(attribution, families, labels, in_half_a)`: its float64
  sums per group (and halves), with `record_total`, the means' denominator.
- The selection rules live in `sparcom.identification.rules` (`select`, `top_fraction_threshold`).
- `identify(store, settings, attribution)`: every family's frequencies (and, for the attribution
  rules, `<family>.attribution_mean`, the group means of the estimates), sets and thresholds, the split-half
  Jaccard J(g_A, h_B) per seed (`<family>_split_jaccard`), the template's share of the counted
  tokens where it is known, with the rule, its parameters and the store's provenance in the
  attributes. Grouped by category or origin everything after the one pass is small and in
  memory; grouped by instruction the frequencies are the counts themselves and stay lazy.
- `identify_store(store_path, settings, out_dir)`: the stage: writes `components.zarr` on the
  current Dask scheduler (see `sparcom.core.cluster`); per instruction, frequencies first, then the
  selection from the written frequencies, so no step holds more than one group's components.
"""

from __future__ import annotations

import itertools
import math
import warnings
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import xarray as xr
import zarr

# dask's task objects, to fuse a run's reads into its product: dask is pinned (pyproject.toml).
from dask._task_spec import Alias, List, Task, TaskRef, convert_legacy_graph
from dask.array.core import concatenate3
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from sparcom.core.outputs import building, claimed
from sparcom.extraction.schema import INSTRUCTION, TOKEN_COUNT
from sparcom.extraction.store import StoreError, open_store
from sparcom.identification.rules import check_rule, select_by
from sparcom.identification.schema import (
    ATTRIBUTION_RULES,
    COMPONENTS,
    FAMILIES,
    GROUP,
    RANK_RULES,
    RECORD_TOTAL,
    RUN_KIND,
    Family,
    families_in,
)
from sparcom.identification.settings import IdentificationSettings
from sparcom.identification.split_half import SPLIT_JACCARD, SPLIT_SEED, cross_jaccard, half_assignment
from sparcom.identification.template import template_share

COLUMN = "sum_column"
# The one-pass contraction reads blocks of whole store chunks of about this size.
CONTRACTION_BLOCK_BYTES = 128 * 2**20
# ... and converts and multiplies them in tiles of this size, which stay in the cache.
TILE_BYTES = 2**22
SUM_FAN_IN = 8
ONE_PER_GROUP = "grouped by instruction: one instruction per group, no halves"
PROVENANCE = ("model", "model_fingerprint", "dataset_hash", "token_span")


def _group_labels(store: xr.Dataset, by: str) -> np.ndarray:
    key = "instruction_id" if by == INSTRUCTION else by
    if key not in store.coords:
        raise ValueError(f"cannot group by {by!r}: the store has no {key!r} coordinate along instruction")
    labels = np.array([str(label) for label in store[key].values.tolist()], dtype=str)
    if by == INSTRUCTION and len(np.unique(labels)) < len(labels):
        raise ValueError("cannot group by instruction: instruction_id values repeat")
    return labels


def _group_index(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(groups sorted, each instruction's group as an index into them)."""
    groups = np.unique(labels)
    return groups, np.searchsorted(groups, labels)


def _block_sums(group_count: int, groups: list[np.ndarray], weights: list[np.ndarray],
                blocks: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    """sums[group, column, ...] = sum over the blocks' rows of that group of weights[row, column] *
    counts[row, ...], computed in the weights' float type and returned in `dtype`.

    Each group's rows are one matrix product with its own weights: a row is multiplied only by
    its own group's columns, not by every group's (with six groups and five split-half seeds, 6
    columns of 36). The counts go through in tiles of TILE_BYTES: a tile of every row is
    converted to the float type, in group order, and multiplied while it is in the cache, into
    one buffer reused from tile to tile (a run-sized float copy cost more in page faults and
    memory traffic than the products)."""
    group = np.concatenate(groups)
    order = np.argsort(group, kind="stable")
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    weight = np.concatenate(weights)[order]
    bounds = np.searchsorted(group[order], np.arange(group_count + 1))
    present = [(g, slice(bounds[g], bounds[g + 1])) for g in range(group_count) if bounds[g + 1] > bounds[g]]
    flat = [block.reshape(len(block), -1) for block in blocks]
    width = flat[0].shape[1]
    tile = max(1, TILE_BYTES // (len(order) * weight.itemsize))
    counts = np.empty((len(order), min(tile, width)), dtype=weight.dtype)
    product = np.empty((weight.shape[1], counts.shape[1]), dtype=weight.dtype)
    sums = np.zeros((group_count, weight.shape[1], width), dtype=dtype)
    for first in range(0, width, tile):
        columns = slice(first, min(first + tile, width))
        size = columns.stop - first
        start = 0
        for block in flat:
            counts[position[start:start + len(block)], :size] = block[:, columns]
            start += len(block)
        for g, members in present:
            np.matmul(weight[members].T, counts[members, :size], out=product[:, :size])
            sums[g, :, columns] = product[:, :size]
    return sums.reshape(group_count, weight.shape[1], *blocks[0].shape[1:])


def _added(parts: list[np.ndarray]) -> np.ndarray:
    total = parts[0].copy()
    for part in parts[1:]:
        np.add(total, part, out=total)
    return total


def _contract(counts: xr.DataArray, group: np.ndarray, group_count: int, weights: np.ndarray,
              dtype: np.dtype) -> xr.DataArray:
    """sums[group, column, ...] = sum over the group's instructions of weights[instruction, column]
    * counts[instruction, ...], in `dtype`: per group, matrix products (BLAS) in the weights' float
    type, one per run of store chunks of about CONTRACTION_BLOCK_BYTES, added up in a tree of
    in-place sums: one read of every chunk, memory a few runs per worker. Exact: every partial
    sum is an integer no larger than the total, and the caller picks a float type and a `dtype`
    that hold the total.

    A run's chunks are read inside its product's task (the tasks fused), so a run is read where
    it is multiplied. Read as tasks of their own, the chunks went to whichever worker was free,
    and a third of them travelled to another worker to meet their run (1.3 GB on the MoE
    benchmark), which cost more than the products."""
    data = _plain(counts).data
    dims = (GROUP, COLUMN, *[d for d in counts.dims if d != INSTRUCTION])
    if not isinstance(data, da.Array):
        return xr.DataArray(_block_sums(group_count, [group], [weights], [np.asarray(data)], dtype), dims=dims)
    starts = np.cumsum((0,) + data.chunks[0])
    chunk_bytes = data.dtype.itemsize * data.chunks[0][0] * math.prod(max(c) for c in data.chunks[1:])
    per_task = max(1, CONTRACTION_BLOCK_BYTES // chunk_bytes)
    name = "sparcom-sums-" + tokenize(data, group, weights, dtype)
    # The counts' own graph, less the chunk reads fused into the products below.
    graph = convert_legacy_graph(dict(data.__dask_graph__()))
    for rest in itertools.product(*[range(len(c)) for c in data.chunks[1:]]):
        level = []
        for first in range(0, len(data.chunks[0]), per_task):
            run = range(first, min(first + per_task, len(data.chunks[0])))
            key = (f"{name}-part", first, *rest)
            chunks = [graph.pop((data.name, i, *rest)) for i in run]
            product = Task(key, _block_sums, group_count, [group[starts[i]:starts[i + 1]] for i in run],
                           [weights[starts[i]:starts[i + 1]] for i in run], List(*[TaskRef(c.key) for c in chunks]), dtype)
            graph[key] = Task.fuse(*chunks, product, key=key)
            level.append(key)
        depth = 0
        while len(level) > 1:  # fan-in of SUM_FAN_IN per step
            depth += 1
            level_keys = []
            for k in range(0, len(level), SUM_FAN_IN):
                key = (f"{name}-add{depth}", k, *rest)
                graph[key] = Task(key, _added, List(*[TaskRef(part) for part in level[k:k + SUM_FAN_IN]]))
                level_keys.append(key)
            level = level_keys
        graph[(name, 0, 0, *rest)] = Alias((name, 0, 0, *rest), level[0])
    summed = da.Array(HighLevelGraph.from_collections(name, graph), name,
                      chunks=((group_count,), (weights.shape[1],), *data.chunks[1:]), dtype=dtype)
    return xr.DataArray(summed, dims=dims)


def group_sums(counts: xr.DataArray, labels: np.ndarray) -> xr.DataArray:
    """Summed counts per group (groups sorted), lazy when the counts are; float64, so exact for
    every total below 2**53."""
    groups, group = _group_index(labels)
    sums = _contract(counts, group, len(groups), np.ones((len(labels), 1)), np.float64).isel({COLUMN: 0}, drop=True)
    return sums.assign_coords({GROUP: groups.astype(object)})


def _per_instruction(counts: xr.DataArray, labels: np.ndarray) -> xr.DataArray:
    """The counts themselves, one group per instruction (no sum, no copy: still chunk-wise)."""
    return _plain(counts).astype(np.float64).rename({INSTRUCTION: GROUP}).assign_coords(
        {GROUP: labels.astype(object)})


def _plain(counts: xr.DataArray) -> xr.DataArray:
    return counts.drop_vars([c for c in counts.coords if INSTRUCTION in counts[c].dims])


def _frequency(sums: xr.DataArray, tokens: xr.DataArray, name: str = "frequency") -> xr.DataArray:
    """sums / tokens, 0 where a group has no tokens (its sums are 0 too), checked to lie in [0, 1]."""
    return _in_unit_interval(sums / tokens.where(tokens > 0, np.inf), name)


def _in_unit_interval(frequency: xr.DataArray, name: str) -> xr.DataArray:
    """Checked as computed: a count above its token count means a damaged or inconsistent store."""
    def check(block: np.ndarray) -> np.ndarray:
        if block.size and not (block.min() >= 0 and block.max() <= 1):
            raise StoreError(f"{name}: frequencies outside [0, 1] (from {block.min():.3g} to {block.max():.3g}): "
                             "counts exceed token counts, the store is inconsistent")
        return block

    if frequency.chunks:
        return frequency.copy(data=frequency.data.map_blocks(check, dtype=frequency.dtype))
    return frequency.copy(data=check(frequency.values))


def group_frequencies(store: xr.Dataset, by: str = "category") -> xr.Dataset:
    """token_total[group] and, per family in the store, frequency[group, ...] (lazy)."""
    labels = _group_labels(store, by)
    sums = _per_instruction if by == INSTRUCTION else group_sums
    token_total = sums(store.token_count, labels).compute()
    result = xr.Dataset({"token_total": token_total.astype(np.uint64)})
    for family in families_in(store):
        frequency = _frequency(sums(store[family.count], labels), token_total, family.frequency)
        result[family.frequency] = frequency.transpose(GROUP, *family.component_dims(store))
    if by == INSTRUCTION:
        result = result.assign_coords({c: (GROUP, store[c].values) for c in ("category", "origin")
                                       if c in store.coords})
    return result


def _gathered(arrays: list[da.Array | np.ndarray]) -> list[np.ndarray]:
    """The arrays in memory here, their blocks computed at once and joined in this process. Left
    to dask, one worker would first fetch every block, join them and send the whole here (on the
    MoE benchmark 2.5 s between the last task's end and the result, against 0.3 s)."""
    grids = [array.to_delayed() if isinstance(array, da.Array) else None for array in arrays]
    blocks = iter(dask.compute(*[block for grid in grids if grid is not None for block in grid.ravel()]))
    joined = []
    for array, grid in zip(arrays, grids):
        if grid is None:
            joined.append(array)
            continue
        placed = np.empty(grid.shape, dtype=object)
        for index in np.ndindex(grid.shape):
            placed[index] = next(blocks)
        joined.append(concatenate3(placed.tolist()))
    return joined


def one_pass_sums(store: xr.Dataset, labels: np.ndarray, in_half_a: np.ndarray | None) -> xr.Dataset:
    """In memory, from one read of every count variable: `token_total[group]` and per family
    `<count>[group, ...]`; with halves (in_half_a[split_seed, instruction]) also
    `half_tokens[split_seed, group]` and `<count>_half_a[split_seed, group, ...]`.

    Weights [instruction, column] hold a column of ones and, per seed, whether the instruction
    is in its group's half A, so the counts are contracted once for all of them.
    """
    groups, group = _group_index(labels)
    seeds = 0 if in_half_a is None else len(in_half_a)
    weights = np.column_stack([np.ones(len(labels), dtype=bool), *(in_half_a if seeds else [])])
    token_count = store.token_count.values.astype(np.float64)
    tokens = _block_sums(len(groups), [group], [weights.astype(np.float64)], [token_count], np.float64)
    # Counts never exceed tokens, so no sum exceeds the tokens of all instructions: float32
    # (twice the speed, half the memory) is exact up to 2**24 of them, float64 beyond.
    weights = weights.astype(np.float32 if token_count.sum() < 2**24 else np.float64)
    # The sums leave the workers in the smallest integer type that holds every column's tokens
    # (no sum exceeds them): exact, and a half or a quarter of the bytes to move and work on.
    exact = next((t for t in (np.uint16, np.uint32) if tokens.max(initial=0) <= np.iinfo(t).max), weights.dtype)
    coords = {GROUP: groups.astype(object)}
    families = families_in(store)
    contracted = [_contract(store[f.count], group, len(groups), weights, exact) for f in families]
    computed = _gathered([sums.data for sums in contracted])
    result = xr.Dataset({"token_total": (GROUP, tokens[:, 0])}, coords=coords)
    if seeds:
        result["half_tokens"] = ((SPLIT_SEED, GROUP), tokens[:, 1:].T)
    for family, sums, values in zip(families, contracted, computed):
        dims = sums.dims[2:]  # values: integers, divided by float64 tokens the same frequencies
        result[family.count] = ((GROUP, *dims), values[:, 0])
        if seeds:
            result[f"{family.count}_half_a"] = ((SPLIT_SEED, GROUP, *dims), values[:, 1:].swapaxes(0, 1))
    return result.assign_coords({d: store[d] for d in result.dims if d in store.coords})


def open_attribution(settings: IdentificationSettings, store: xr.Dataset, store_path: object) -> xr.Dataset | None:
    """The verified attribution store of an attribution rule (None for the other rules), refused
    when missing, or when its records, model or families are not the count store's."""
    if settings.rule not in ATTRIBUTION_RULES:
        return None
    if settings.attribution is None:
        raise ValueError(f"rule {settings.rule!r} selects by attribution estimates: pass --attribution "
                         "ATTR.zarr (made by `sparcom attribute` from the count store's dataset)")
    attribution = open_store(settings.attribution)
    where = f"{settings.attribution} and the count store {store_path}"
    ours, theirs = (np.array([str(i) for i in s.instruction_id.values.tolist()]) for s in (attribution, store))
    if len(ours) != len(theirs) or (ours != theirs).any():
        differ = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        raise ValueError(f"{where}: the instructions differ ({len(ours)} and {len(theirs)} records, first "
                         f"difference at position {differ}); make the attribution store from the same dataset")
    fingerprints = [s.attrs.get("model_fingerprint") for s in (attribution, store)]
    if None not in fingerprints and fingerprints[0] != fingerprints[1]:
        raise ValueError(f"{where}: of different models (fingerprints {fingerprints[0][:12]} and "
                         f"{fingerprints[1][:12]}); make the attribution store with the count store's model")
    missing = [f"{f.attribution} (for {f.name})" for f in families_in(store) if f.attribution not in attribution]
    if missing:
        raise ValueError(f"{where}: the attribution store lacks {', '.join(missing)}")
    return attribution


def estimate_sums(attribution: xr.Dataset, families: list[Family], labels: np.ndarray,
                  in_half_a: np.ndarray | None) -> xr.Dataset:
    """In memory, float64, from one read of the estimates: `record_total[group]` and per family
    `<attribution>[group, ...]`, the summed estimates; with halves also
    `half_records[split_seed, group]` and `<attribution>_half_a[split_seed, group, ...]`."""
    groups, group = _group_index(labels)
    seeds = 0 if in_half_a is None else len(in_half_a)
    weights = np.column_stack([np.ones(len(labels), dtype=bool), *(in_half_a if seeds else [])]).astype(np.float64)
    records = np.stack([np.bincount(group, weights=column, minlength=len(groups)) for column in weights.T], axis=1)
    contracted = [_contract(attribution[f.attribution], group, len(groups), weights, np.float64) for f in families]
    computed = _gathered([sums.data for sums in contracted])
    result = xr.Dataset({RECORD_TOTAL: (GROUP, records[:, 0])}, coords={GROUP: groups.astype(object)})
    if seeds:
        result["half_records"] = ((SPLIT_SEED, GROUP), records[:, 1:].T)
    for family, sums, values in zip(families, contracted, computed):
        dims = sums.dims[2:]
        result[family.attribution] = ((GROUP, *dims), values[:, 0])
        if seeds:
            result[f"{family.attribution}_half_a"] = ((SPLIT_SEED, GROUP, *dims), values[:, 1:].swapaxes(0, 1))
    return result.assign_coords({d: attribution[d] for d in result.dims if d in attribution.coords})


def _estimate_means(attribution: xr.Dataset, families: list[Family], labels: np.ndarray) -> xr.Dataset:
    """Per instruction: `record_total` (ones) and each family's estimates as its 'means'."""
    means = {f.attribution_mean: _per_instruction(attribution[f.attribution], labels) for f in families}
    return xr.Dataset({RECORD_TOTAL: (GROUP, np.ones(len(labels), dtype=np.int64)), **means},
                      coords={GROUP: labels.astype(object)})


def _selection(frequencies: xr.Dataset, settings: IdentificationSettings) -> xr.Dataset:
    result = xr.Dataset()
    for family in families_in(frequencies, by="frequency"):
        chosen = select_by(frequencies[family.ranked_by(settings.rule)], settings, family.layer_dim)
        result[family.selected] = chosen.selected
        result[family.threshold] = chosen.threshold
    return result.reset_coords(drop=True)  # leave the non-index coordinates where they are


def _split_jaccard(sums: xr.Dataset, family: Family, settings: IdentificationSettings) -> xr.DataArray:
    """J(g_A, h_B)[split_seed, group, other_group]: each half selected with the same rule, all
    groups' A halves together (the rules that compare groups compare halves with halves). The
    attribution rules select from their halves' summed estimates over their halves' records."""
    summed, total, half_total = ((family.attribution, RECORD_TOTAL, "half_records") if settings.rule in ATTRIBUTION_RULES
                                 else (family.count, "token_total", "half_tokens"))
    whole, half_a = sums[summed], sums[f"{summed}_half_a"]
    dims = [d for d in whole.dims if d != GROUP]
    per_seed = []
    for seed in range(sums.sizes[SPLIT_SEED]):
        a_sums, a_tokens = half_a.isel({SPLIT_SEED: seed}, drop=True), sums[half_total].isel({SPLIT_SEED: seed}, drop=True)
        a = _half_sets(a_sums, a_tokens, family, settings)
        b = _half_sets(whole - a_sums, sums[total] - a_tokens, family, settings)
        per_seed.append(cross_jaccard(a, b, dims))
    return xr.concat(per_seed, SPLIT_SEED)


def _half_sets(sums: xr.DataArray, tokens: xr.DataArray, family: Family, settings: IdentificationSettings
               ) -> xr.DataArray:
    """One half's sets. A rule that ranks within each group (`RANK_RULES`) selects the same sets
    from the summed counts as from the frequencies, so only their extremes are divided, to check
    them as frequencies are checked. The attribution rules' means (sums over records) have any sign."""
    if settings.rule in ATTRIBUTION_RULES:
        return select_by(sums / tokens, settings, family.layer_dim).selected
    if settings.rule not in RANK_RULES:
        return select_by(_frequency(sums, tokens, family.frequency), settings, family.layer_dim).selected
    dims = [d for d in sums.dims if d != GROUP]
    _frequency(xr.concat([sums.min(dims), sums.max(dims)], "extreme"), tokens, family.frequency)
    if (tokens == 0).any():  # frequencies are 0 there, whatever an inconsistent store counted
        sums = sums.where(tokens > 0, 0)
    return select_by(sums, settings, family.layer_dim).selected


def _attrs(store: xr.Dataset, settings: IdentificationSettings, attribution: xr.Dataset | None = None) -> dict:
    estimates = {} if attribution is None else {
        "attribution_store": str(settings.attribution),
        "attribution_max_response_tokens": attribution.attrs.get("max_response_tokens", 0)}
    return {
        **estimates,
        **{k: store.attrs[k] for k in PROVENANCE if k in store.attrs},
        "group_by": settings.group_by,
        "rule": settings.rule,
        "epsilon": settings.epsilon,
        "tau": settings.tau,
        "top_rate": settings.top_rate,
        "filter_rate": settings.filter_rate,
        "bar_ratio": settings.bar_ratio,
        "split_half_seeds": settings.split_half_seeds,
    }


def _check_store(store: xr.Dataset, where: object) -> None:
    if not families_in(store):
        raise ValueError(f"{where}: no count variable ({', '.join(f.count for f in FAMILIES)})")
    if TOKEN_COUNT not in store:
        raise ValueError(f"{where}: no token_count variable")


def _checked_labels(store: xr.Dataset, settings: IdentificationSettings, where: object) -> np.ndarray:
    """The group labels, after every check that needs no counts: bad input fails before work."""
    _check_store(store, where)
    labels = _group_labels(store, settings.group_by)
    check_rule(settings, np.unique(labels))
    return labels


def identify(store: xr.Dataset, settings: IdentificationSettings, attribution: xr.Dataset | None = None
             ) -> xr.Dataset:
    """Frequencies, sets and thresholds of every family, and their split-half Jaccard values
    (lazy only when grouped by instruction). The attribution rules need `attribution`, the
    attribution store of the same records (`open_attribution`)."""
    labels = _checked_labels(store, settings, "store")
    if settings.rule in ATTRIBUTION_RULES and attribution is None:
        raise ValueError(f"rule {settings.rule!r} selects by attribution estimates: it needs an attribution store")
    attrs = _attrs(store, settings, attribution)
    families = families_in(store)
    if settings.group_by == INSTRUCTION:
        frequencies = group_frequencies(store, INSTRUCTION)
        if attribution is not None:
            frequencies = frequencies.merge(_estimate_means(attribution, families, labels))
        attrs["split_half_left_out"] = ONE_PER_GROUP
        return xr.merge([frequencies, _selection(frequencies, settings)]).assign_attrs(attrs)
    origins = _group_labels(store, "origin") if "origin" in store.coords else None
    in_half_a, left_out = half_assignment(labels, origins, settings.split_half_seeds)
    sums = one_pass_sums(store, labels, in_half_a)
    frequencies = xr.Dataset({"token_total": sums.token_total.astype(np.uint64), **{
        f.frequency: _frequency(sums[f.count], sums.token_total, f.frequency) for f in families}})
    if attribution is not None:  # the estimates' sums beside the counts', the frequencies kept
        sums = sums.merge(estimate_sums(attribution, families, labels, in_half_a))
        frequencies = frequencies.assign({RECORD_TOTAL: sums[RECORD_TOTAL].astype(np.int64), **{
            f.attribution_mean: sums[f.attribution] / sums[RECORD_TOTAL] for f in families}})
    result = xr.merge([frequencies, _selection(frequencies, settings)])
    if left_out:
        attrs["split_half_left_out"] = left_out
    else:
        for family in families:
            result[f"{family.name}_{SPLIT_JACCARD}"] = _split_jaccard(sums, family, settings)
    share, reason = template_share(store.attrs, labels, sums.token_total)
    if share is not None:
        result["template_share"] = share
    attrs.update(reason)
    return result.assign_attrs(attrs)


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
    verified first; `out_dir` must be new, empty or an earlier run folder (`sparcom.core.outputs`)."""
    store = open_store(store_path)
    labels = _checked_labels(store, settings, store_path)
    attribution = open_attribution(settings, store, store_path)
    target = Path(out_dir) / COMPONENTS
    with claimed(out_dir, RUN_KIND), building(target, "components") as path:
        if settings.group_by == INSTRUCTION:
            frequencies = group_frequencies(store, settings.group_by)
            if attribution is not None:
                frequencies = frequencies.merge(_estimate_means(attribution, families_in(store), labels))
            frequencies.attrs = {**_attrs(store, settings, attribution), "split_half_left_out": ONE_PER_GROUP}
            _write_zarr(frequencies, path, mode="w")
            written = xr.open_zarr(path, consolidated=False)
            _write_zarr(_selection(written, settings).assign_attrs(written.attrs), path, mode="a")
        else:
            _write_zarr(identify(store, settings, attribution), path, mode="w")
        with warnings.catch_warnings():  # zarr warns that the v3 spec has not adopted consolidation yet
            warnings.filterwarnings("ignore", "Consolidated metadata", category=UserWarning)
            warnings.filterwarnings("ignore", "Object at .sparcom-output", category=UserWarning)
            zarr.consolidate_metadata(path)
    return target
