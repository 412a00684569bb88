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
- `open_attribution(settings, store, store_path)`: the attribution store (ATTR.zarr) the
  attribution rules select from, checked against the count store (same instructions, same model,
  every family); None when no rule of the settings is one. `estimate_sums(attribution, families,
  labels, in_half_a)`: its float64 sums per group (and halves), with `record_total`, the means'
  denominator, as `one_pass_sums` gives the counts'.
- The selection rules live in `sparcom.identification.rules` (`select`, `top_fraction_threshold`).
- `split_null_gaps(store, labels, origins, rule_settings, permutations, seeds)`: the split-half
  null's gaps (`<family>_split_null_gap[permutation, group]`): group labels shuffled across
  instructions, the gap recomputed as observed, the permutations summed in batches under
  NULL_BATCH_BYTES.
- `identify(store, settings, attribution)`: every family's frequencies (and, for the attribution
  rules, `<family>.attribution_mean`, the group means of the estimates), sets and thresholds, the split-half
  Jaccard J(g_A, h_B) per seed (`<family>_split_jaccard`) and the null's gaps, the template's
  share of the counted tokens where it is known, with the rule, its parameters and the store's
  provenance in the attributes. Grouped by category or origin everything after the one pass is
  small and in memory; grouped by instruction the frequencies are the counts themselves and
  stay lazy. `identify_rules(store, settings, attribution)`: the same for every rule of
  `settings.rules`, from the same sums.
- `identify_store(store_path, settings, out_dir)`: the stage: writes `components.zarr` on the
  current Dask scheduler (see `sparcom.core.cluster`); per instruction, frequencies first, then the
  selection from the written frequencies, so no step holds more than one group's components.
  `identify_store_rules(store_path, settings, out_dirs)`: each rule's into its own run folder;
  `rule_dirs(out_dir, settings)`: the folders a command given one folder writes to.
"""

from __future__ import annotations

import contextlib
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
from sparcom.identification.rules import check_rule, component_dims, select_by
from sparcom.identification.schema import (
    ATTRIBUTION_RULES,
    COMPONENTS,
    FAMILIES,
    GROUP,
    HALF,
    PERMUTATION,
    RANK_RULES,
    RECORD_TOTAL,
    RUN_KIND,
    SPLIT_SEED,
    Family,
    families_in,
)
from sparcom.identification.settings import IdentificationSettings
from sparcom.identification.split_half import (
    SPLIT_JACCARD,
    SPLIT_NULL_GAP,
    cross_jaccard,
    half_assignment,
    label_permutations,
    reliability,
)
from sparcom.identification.template import template_share

COLUMN = "sum_column"
# The one-pass contraction reads blocks of whole store chunks of about this size.
CONTRACTION_BLOCK_BYTES = 128 * 2**20
# ... and converts and multiplies them in tiles of this size, which stay in the cache.
TILE_BYTES = 2**22
SUM_FAN_IN = 8
# The split-half null's sums held at once (here, and about as much spread over the workers):
# above it the permutations are summed in batches, each one more read of the counts.
NULL_BATCH_BYTES = 2**28
ONE_PER_GROUP = "grouped by instruction: one instruction per group, no halves"
# The names of one kind of sums (`_as_sums`): the groups' totals, their halves' totals, and each
# family's attribute naming its summed variable: the counts over tokens, or the estimates over records.
COUNT_SUMS = ("token_total", "half_tokens", "count")
ESTIMATE_SUMS = (RECORD_TOTAL, "half_records", "attribution")
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


def _weighted_sums(store: xr.Dataset, group: np.ndarray, group_count: int, weights: np.ndarray
                   ) -> tuple[np.ndarray, list[tuple[Family, tuple[str, ...], np.ndarray]]]:
    """From one read of every count variable: tokens[group, column] and, per family,
    (family, component dims, sums[group, column, ...]) of the 0/1 `weights[instruction, column]`."""
    token_count = store.token_count.values.astype(np.float64)
    tokens = _block_sums(group_count, [group], [weights.astype(np.float64)], [token_count], np.float64)
    # Counts never exceed tokens, so no sum exceeds the tokens of all instructions: float32
    # (twice the speed, half the memory) is exact up to 2**24 of them, float64 beyond.
    weights = weights.astype(np.float32 if token_count.sum() < 2**24 else np.float64)
    # The sums leave the workers in the smallest integer type that holds every column's tokens
    # (no sum exceeds them): exact, and a half or a quarter of the bytes to move and work on.
    exact = next((t for t in (np.uint16, np.uint32) if tokens.max(initial=0) <= np.iinfo(t).max), weights.dtype)
    families = families_in(store)
    contracted = [_contract(store[f.count], group, group_count, weights, exact) for f in families]
    computed = _gathered([sums.data for sums in contracted])
    return tokens, [(f, sums.dims[2:], values) for f, sums, values in zip(families, contracted, computed)]


def _as_sums(tokens: np.ndarray, family_sums: list, groups: np.ndarray, store: xr.Dataset,
             lead: tuple[str, ...] = (), names: tuple[str, str, str] = COUNT_SUMS) -> xr.Dataset:
    """The dataset `one_pass_sums` describes, from tokens[*lead, group, column] and per family
    sums[*lead, group, column, ...], column 0 the whole group and column 1 + s seed s's half A
    (`names`: ESTIMATE_SUMS for the estimates' sums, records in place of tokens)."""
    total, half_total, variable = names
    seeds = tokens.shape[-1] - 1
    whole, half = (slice(None),) * (len(lead) + 1) + (0,), (slice(None),) * (len(lead) + 1) + (slice(1, None),)
    result = xr.Dataset({total: ((*lead, GROUP), tokens[whole])}, coords={GROUP: groups.astype(object)})
    if seeds:
        result[half_total] = ((*lead, SPLIT_SEED, GROUP), np.moveaxis(tokens[half], -1, -2))
    for family, dims, values in family_sums:  # integers: divided by float64 tokens the same frequencies
        name = getattr(family, variable)
        result[name] = ((*lead, GROUP, *dims), values[whole])
        if seeds:
            result[f"{name}_half_a"] = ((*lead, SPLIT_SEED, GROUP, *dims),
                                        np.moveaxis(values[half], len(lead) + 1, len(lead)))
    return result.assign_coords({d: store[d] for d in result.dims if d in store.coords})


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
    tokens, family_sums = _weighted_sums(store, group, len(groups), weights)
    return _as_sums(tokens, family_sums, groups, store)


def open_attribution(settings: IdentificationSettings, store: xr.Dataset, store_path: object) -> xr.Dataset | None:
    """The verified attribution store of the attribution rules (None when the settings have none),
    refused when missing, or when its records, model or families are not the count store's."""
    chosen = [rule for rule in settings.selected_rules() if rule in ATTRIBUTION_RULES]
    if not chosen:
        return None
    if settings.attribution is None:
        raise ValueError(f"rule {chosen[0]!r} selects by attribution estimates: pass --attribution ATTR.zarr "
                         "(made by `sparcom attribute` from the count store's dataset)")
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


def _weighted_estimates(attribution: xr.Dataset, families: list[Family], group: np.ndarray, group_count: int,
                        weights: np.ndarray) -> tuple[np.ndarray, list[tuple[Family, tuple[str, ...], np.ndarray]]]:
    """From one read of the estimates: records[group, column] and, per family, (family, component
    dims, sums[group, column, ...]) of the 0/1 `weights[instruction, column]`, all float64."""
    weights = weights.astype(np.float64)
    records = np.stack([np.bincount(group, weights=column, minlength=group_count) for column in weights.T], axis=1)
    contracted = [_contract(attribution[f.attribution], group, group_count, weights, np.float64) for f in families]
    computed = _gathered([sums.data for sums in contracted])
    return records, [(f, sums.dims[2:], values) for f, sums, values in zip(families, contracted, computed)]


def estimate_sums(attribution: xr.Dataset, families: list[Family], labels: np.ndarray,
                  in_half_a: np.ndarray | None) -> xr.Dataset:
    """In memory, float64: `record_total[group]` and per family `<attribution>[group, ...]`, the
    summed estimates; with halves also `half_records[split_seed, group]` and
    `<attribution>_half_a[split_seed, group, ...]`."""
    groups, group = _group_index(labels)
    seeds = 0 if in_half_a is None else len(in_half_a)
    weights = np.column_stack([np.ones(len(labels), dtype=bool), *(in_half_a if seeds else [])])
    records, family_sums = _weighted_estimates(attribution, families, group, len(groups), weights)
    return _as_sums(records, family_sums, groups, attribution, names=ESTIMATE_SUMS)


def _estimate_means(attribution: xr.Dataset, families: list[Family], labels: np.ndarray) -> xr.Dataset:
    """Per instruction: `record_total` (ones) and each family's estimates as its 'means'."""
    means = {f.attribution_mean: _per_instruction(attribution[f.attribution], labels) for f in families}
    return xr.Dataset({RECORD_TOTAL: (GROUP, np.ones(len(labels), dtype=np.int64)), **means},
                      coords={GROUP: labels.astype(object)})


def _null_batches(store: xr.Dataset, labels: np.ndarray, seeds: int, permutations: int, batch_bytes: int
                  ) -> list[range]:
    """Consecutive permutations whose arrays take at most about `batch_bytes` (at least one
    permutation a batch): per permutation and component, G x (1 + seeds) float32 sums and, for
    the selection, the halves' float64 frequencies and sets (2 x seeds x G of each)."""
    components = sum(math.prod(store[f.count].shape[1:]) for f in families_in(store))
    groups = len(np.unique(labels))
    per_permutation = groups * components * ((1 + seeds) * 4 + 2 * seeds * (8 + 1))
    size = max(1, batch_bytes // per_permutation)
    return [range(first, min(first + size, permutations)) for first in range(0, permutations, size)]


def split_null_gaps(store: xr.Dataset, labels: np.ndarray, origins: np.ndarray | None,
                    rule_settings: dict[str, IdentificationSettings], permutations: int, seeds: int,
                    batch_bytes: int = NULL_BATCH_BYTES, attribution: xr.Dataset | None = None
                    ) -> dict[str, dict[str, xr.DataArray]]:
    """rule -> family -> the split-half null's gap[permutation, group] (docs/method.md section 4b):
    per permutation (`label_permutations`), the halves dealt on the permuted labels with the
    same seeds, summed and selected with each rule as the observed ones are (`_split_jaccard`).

    A permutation's sums are another weighting of the counts: one column per permuted group and
    per (group, seed)'s half A. The permutations go through in batches whose arrays take about
    `batch_bytes` at most (`_null_batches`), each batch one more read of the counts, its
    permutations selected together; the result does not depend on the batches (each
    permutation's seed is its index). With `attribution` (for the attribution rules) the
    estimates are summed with the same columns in the same batches."""
    groups, _ = _group_index(labels)
    shuffled = label_permutations(labels, permutations)
    gaps = {rule: {f.name: [] for f in families_in(store)} for rule in rule_settings}
    for batch in _null_batches(store, labels, seeds, permutations, batch_bytes):
        columns = []
        for k in batch:
            in_half_a, _ = half_assignment(shuffled[k], origins, seeds)
            for g in groups:
                member = shuffled[k] == g
                columns += [member, *(member & half for half in in_half_a)]
        tokens, family_sums = _weighted_sums(store, np.zeros(len(labels), dtype=np.intp), 1, np.column_stack(columns))
        shape = (len(batch), len(groups), 1 + seeds)
        sums = _as_sums(tokens.reshape(shape), [(f, dims, values.reshape(*shape, *values.shape[2:]))
                                                for f, dims, values in family_sums], groups, store, (PERMUTATION,))
        if attribution is not None:
            records, family_sums = _weighted_estimates(attribution, families_in(store), np.zeros(len(labels), dtype=np.intp),
                                                       1, np.column_stack(columns))
            sums = sums.merge(_as_sums(records.reshape(shape), [(f, dims, values.reshape(*shape, *values.shape[2:]))
                                                                for f, dims, values in family_sums],
                                       groups, attribution, (PERMUTATION,), ESTIMATE_SUMS))
        for rule, settings in rule_settings.items():
            for family in families_in(store):
                gap = reliability(_split_jaccard(sums, family, settings)).specificity_gap
                gaps[rule][family.name].append(gap.transpose(PERMUTATION, GROUP).values)
    return {rule: {name: xr.DataArray(np.concatenate(parts), dims=(PERMUTATION, GROUP),
                                      coords={GROUP: groups.astype(object)})
                   for name, parts in per_family.items()} for rule, per_family in gaps.items()}


def _selection(frequencies: xr.Dataset, settings: IdentificationSettings) -> xr.Dataset:
    result = xr.Dataset()
    for family in families_in(frequencies, by="frequency"):
        chosen = select_by(frequencies[family.ranked_by(settings.rule)], settings, family.layer_dim)
        result[family.selected] = chosen.selected
        result[family.threshold] = chosen.threshold
    return result.reset_coords(drop=True)  # leave the non-index coordinates where they are


def _split_jaccard(sums: xr.Dataset, family: Family, settings: IdentificationSettings) -> xr.DataArray:
    """J(g_A, h_B)[split_seed, group, other_group] (first along `permutation` where the sums
    have it: the null's): each half selected with the same rule, all groups' A halves together
    (the rules that compare groups compare halves with halves), every seed and half at once. The
    attribution rules select from their halves' summed estimates over their halves' records."""
    total, half_total, variable = ESTIMATE_SUMS if settings.rule in ATTRIBUTION_RULES else COUNT_SUMS
    summed = getattr(family, variable)
    whole, half_a = sums[summed], sums[f"{summed}_half_a"]
    halves = xr.concat([half_a, (whole - half_a).transpose(*half_a.dims)], HALF)
    tokens = xr.concat([sums[half_total], (sums[total] - sums[half_total]).transpose(*sums[half_total].dims)],
                       HALF)
    sets = _half_sets(halves, tokens, family, settings)
    return cross_jaccard(sets.isel({HALF: 0}, drop=True), sets.isel({HALF: 1}, drop=True), component_dims(whole))


def _half_sets(sums: xr.DataArray, tokens: xr.DataArray, family: Family, settings: IdentificationSettings
               ) -> xr.DataArray:
    """The halves' sets. A rule that ranks within each group (`RANK_RULES`) selects the same sets
    from the summed counts as from the frequencies, so only their extremes are divided, to check
    them as frequencies are checked. The attribution rules' means (sums over records) have any sign."""
    if settings.rule in ATTRIBUTION_RULES:
        return select_by(sums / tokens, settings, family.layer_dim).selected
    if settings.rule not in RANK_RULES:
        return select_by(_frequency(sums, tokens, family.frequency), settings, family.layer_dim).selected
    dims = component_dims(sums)
    _frequency(xr.concat([sums.min(dims), sums.max(dims)], "extreme"), tokens, family.frequency)
    if (tokens == 0).any():  # frequencies are 0 there, whatever an inconsistent store counted
        sums = sums.where(tokens > 0, 0)
    return select_by(sums, settings, family.layer_dim).selected


def _attrs(store: xr.Dataset, settings: IdentificationSettings, attribution: xr.Dataset | None = None) -> dict:
    estimates = {} if attribution is None or settings.rule not in ATTRIBUTION_RULES else {
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
        "split_half_permutations": settings.split_half_permutations,
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
    for rule in settings.selected_rules():
        check_rule(settings.for_rule(rule), np.unique(labels))
    return labels


def identify_rules(store: xr.Dataset, settings: IdentificationSettings, attribution: xr.Dataset | None = None
                   ) -> dict[str, xr.Dataset]:
    """rule -> what `identify` gives for that rule alone, for every rule of the settings, from one
    pass over the counts (and one more per batch of the split-half null's permutations). The
    attribution rules need `attribution`, the attribution store of the same records
    (`open_attribution`); their results add the estimates' group means beside the frequencies."""
    labels = _checked_labels(store, settings, "store")
    rules = {rule: settings.for_rule(rule) for rule in settings.selected_rules()}
    needs_estimates = any(rule in ATTRIBUTION_RULES for rule in rules)
    if needs_estimates and attribution is None:
        raise ValueError(f"rules {list(rules)} select by attribution estimates: they need an attribution store")
    families = families_in(store)
    if settings.group_by == INSTRUCTION:
        frequencies = group_frequencies(store, INSTRUCTION)
        means = _estimate_means(attribution, families, labels) if needs_estimates else None
        return {rule: _with_selection(_ranked(frequencies, means, rule), one).assign_attrs(
            {**_attrs(store, one, attribution), "split_half_left_out": ONE_PER_GROUP}) for rule, one in rules.items()}
    origins = _group_labels(store, "origin") if "origin" in store.coords else None
    in_half_a, left_out = half_assignment(labels, origins, settings.split_half_seeds)
    sums = one_pass_sums(store, labels, in_half_a)
    frequencies = xr.Dataset({"token_total": sums.token_total.astype(np.uint64), **{
        f.frequency: _frequency(sums[f.count], sums.token_total, f.frequency) for f in families}})
    means = None
    if needs_estimates:  # the estimates' sums beside the counts', the frequencies kept
        sums = sums.merge(estimate_sums(attribution, families, labels, in_half_a))
        means = xr.Dataset({RECORD_TOTAL: sums[RECORD_TOTAL].astype(np.int64), **{
            f.attribution_mean: sums[f.attribution] / sums[RECORD_TOTAL] for f in families}})
    share, reason = template_share(store.attrs, labels, sums.token_total)
    null = {}
    if not left_out and settings.split_half_permutations:
        null = split_null_gaps(store, labels, origins, rules, settings.split_half_permutations,
                               settings.split_half_seeds, attribution=attribution if needs_estimates else None)
    results = {}
    for rule, one in rules.items():
        result = _with_selection(_ranked(frequencies, means, rule), one)
        attrs = {**_attrs(store, one, attribution), **reason}
        if left_out:
            attrs["split_half_left_out"] = left_out
        else:
            for family in families:
                result[f"{family.name}_{SPLIT_JACCARD}"] = _split_jaccard(sums, family, one)
                if null:
                    result[f"{family.name}_{SPLIT_NULL_GAP}"] = null[rule][family.name]
            if not null:
                attrs["split_null_left_out"] = "the split-half null switched off (split_half_permutations: 0)"
        if share is not None:
            result["template_share"] = share
        results[rule] = result.assign_attrs(attrs)
    return results


def _ranked(frequencies: xr.Dataset, means: xr.Dataset | None, rule: str) -> xr.Dataset:
    """What a rule's result holds before its sets: the frequencies, and for an attribution rule
    the estimates' means beside them (so a frequency rule's result is the same whichever rules
    run beside it)."""
    return frequencies.merge(means) if rule in ATTRIBUTION_RULES else frequencies


def _with_selection(values: xr.Dataset, settings: IdentificationSettings) -> xr.Dataset:
    return xr.merge([values, _selection(values, settings)])


def identify(store: xr.Dataset, settings: IdentificationSettings, attribution: xr.Dataset | None = None
             ) -> xr.Dataset:
    """Frequencies, sets and thresholds of every family, their split-half Jaccard values and the
    null's gaps, of a one-rule settings (lazy only when grouped by instruction)."""
    if len(settings.selected_rules()) > 1:
        raise ValueError(f"identify selects with one rule; {settings.selected_rules()}: use identify_rules")
    return identify_rules(store, settings, attribution)[settings.selected_rules()[0]]


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


def rule_dirs(out_dir: Path, settings: IdentificationSettings) -> dict[str, Path]:
    """Where a command given one folder writes each rule's run: the folder itself for one rule,
    a folder per rule inside it (`<out_dir>/<rule>`) for several."""
    rules = settings.selected_rules()
    return {rules[0]: Path(out_dir)} if len(rules) == 1 else {rule: Path(out_dir) / rule for rule in rules}


def identify_store(store_path: Path, settings: IdentificationSettings, out_dir: Path) -> Path:
    """`identify_store_rules` of one-rule settings: `out_dir/components.zarr`."""
    (path,) = identify_store_rules(store_path, settings, {settings.selected_rules()[0]: out_dir}).values()
    return path


def identify_store_rules(store_path: Path, settings: IdentificationSettings, out_dirs: dict[str, Path]
                         ) -> dict[str, Path]:
    """Write each rule's `out_dirs[rule]/components.zarr` from one pass over the counts; computes
    on the current Dask scheduler. The store is verified first; each folder must be new, empty or
    an earlier run folder (`sparcom.core.outputs`)."""
    store = open_store(store_path)
    labels = _checked_labels(store, settings, store_path)
    attribution = open_attribution(settings, store, store_path)
    if sorted(out_dirs) != sorted(settings.selected_rules()):
        raise ValueError(f"a run folder for each rule of {settings.selected_rules()}, not of {sorted(out_dirs)}")
    with contextlib.ExitStack() as claims:
        targets = {}
        for rule, out_dir in out_dirs.items():
            claims.enter_context(claimed(out_dir, RUN_KIND))
            targets[rule] = claims.enter_context(building(Path(out_dir) / COMPONENTS, "components"))
        if settings.group_by == INSTRUCTION:
            means = None if attribution is None else _estimate_means(attribution, families_in(store), labels)
            _write_by_instruction(store, settings, targets, attribution, means)
        else:
            for rule, result in identify_rules(store, settings, attribution).items():
                _write_zarr(result, targets[rule], mode="w")
        with warnings.catch_warnings():  # zarr warns that the v3 spec has not adopted consolidation yet
            warnings.filterwarnings("ignore", "Consolidated metadata", category=UserWarning)
            warnings.filterwarnings("ignore", "Object at .sparcom-output", category=UserWarning)
            for path in targets.values():
                zarr.consolidate_metadata(path)
    return {rule: Path(out_dirs[rule]) / COMPONENTS for rule in out_dirs}


def _write_by_instruction(store: xr.Dataset, settings: IdentificationSettings, targets: dict[str, Path],
                          attribution: xr.Dataset | None = None, means: xr.Dataset | None = None) -> None:
    """Per instruction, frequencies first (computed once, written to the first rule's folder and
    copied from there to the others'; an attribution rule's with the estimates beside them), then
    each rule's selection from what it wrote, so no step holds more than one group's components."""
    first = next(iter(targets))
    frequencies = group_frequencies(store, INSTRUCTION)
    for rule, path in targets.items():
        attrs = {**_attrs(store, settings.for_rule(rule), attribution), "split_half_left_out": ONE_PER_GROUP}
        source = (frequencies if rule == first else
                  xr.open_zarr(targets[first], consolidated=False)[list(frequencies.data_vars)])
        _write_zarr(_ranked(source, means, rule).assign_attrs(attrs), path, mode="w")
        written = xr.open_zarr(path, consolidated=False)
        _write_zarr(_selection(written, settings.for_rule(rule)).assign_attrs(written.attrs), path, mode="a")
