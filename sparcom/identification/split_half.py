"""Split-half reliability: is a group's set reproducible from other instructions of the group,
and more alike its own other half than other groups' halves? (docs/method.md section 4b)

- `half_assignment(labels, origins, seeds)`: in_half_a[split_seed, instruction], each group's
  instructions split in two with each seed, stratified by origin, halves differing by at most one;
  or the reason a grouping cannot be split (a group of fewer than MIN_GROUP_SIZE instructions).
- `cross_jaccard(a, b, component_dims)`: J(a_g, b_h) = |a_g & b_h| / |a_g | b_h| for every pair
  of groups, dims (group, other_group); NaN where both sets are empty.
- `reliability(split_jaccard)`: from J(g_A, h_B) per seed: within[group] = mean over seeds of
  J(g_A, g_B), cross[group, other_group] = mean of J(g_A, h_B) for h != g (NaN on the diagonal),
  specificity_gap[group] = within - the mean of the group's cross values.
- `label_permutations(labels, count)`: the null's labels[permutation, instruction], each
  permutation the labels shuffled across instructions (group sizes kept), seeded by its index.
- `null_comparison(gap, null_gap)`: the observed gap against its null: the null's 95th
  percentile (`split_null_q95[group]`) and p = (1 + #{null gap >= gap}) / (1 + P)
  (`split_p[group]`), P the permutations whose gap is defined.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from sparcom.identification.schema import GROUP, PERMUTATION, SPLIT_SEED

OTHER = "other_group"
SPLIT_JACCARD = "split_jaccard"  # per family in components.zarr: J(g_A, h_B)[split_seed, group, other_group]
SPLIT_NULL_GAP = "split_null_gap"  # per family in components.zarr: the null's gap[permutation, group]
# Permutation k shuffles with the seed (PERMUTATION_SEED, k): the same labels whatever the batch.
PERMUTATION_SEED = 4242
NULL_QUANTILE = 0.95
# A half of one instruction is a sample of one; below two per half a split says nothing.
MIN_GROUP_SIZE = 4


def half_assignment(labels: np.ndarray, origins: np.ndarray | None, seeds: int
                    ) -> tuple[np.ndarray | None, str | None]:
    """(in_half_a[seed, instruction], None), or (None, the reason there are no halves)."""
    if seeds == 0:
        return None, "split-half reliability switched off (split_half_seeds: 0)"
    groups, sizes = np.unique(labels, return_counts=True)
    if sizes.min() < MIN_GROUP_SIZE:
        small = groups[sizes < MIN_GROUP_SIZE]
        return None, (f"{len(small)} of {len(groups)} groups have fewer than {MIN_GROUP_SIZE} "
                      f"instructions (e.g. {str(small[0])!r}: {sizes.min()}), too few to split in halves")
    strata = origins if origins is not None else np.zeros(len(labels), dtype=str)
    # Each group's instructions per origin, groups and origins in sorted order.
    order = np.lexsort((strata, labels))
    runs = np.flatnonzero(np.r_[True, (labels[order][1:] != labels[order][:-1]) | (strata[order][1:] != strata[order][:-1])])
    cells = np.split(order, runs[1:])
    group_cells = [[cell for cell in cells if labels[cell[0]] == group] for group in groups]
    in_a = np.zeros((seeds, len(labels)), dtype=bool)
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        for cells_of_group in group_cells:
            # Shuffle within each origin, lay the origins end to end and deal A, B, A, B...: every
            # origin splits evenly (to one) and so do the group's halves.
            members = np.concatenate([rng.permutation(cell) for cell in cells_of_group])
            in_a[seed, members[0::2]] = True
    return in_a, None


def cross_jaccard(a: xr.DataArray, b: xr.DataArray, component_dims: list[str]) -> xr.DataArray:
    """J(a_g, b_h) for every group g of `a` and h of `b` (both with a `group` dim)."""
    if a.chunks is None and b.chunks is None:
        intersection, size_a, size_b = _packed_overlaps(a, b, component_dims)
    else:
        members = a.astype(np.float64)  # exact: counts stay far below 2**53
        other = b.astype(np.float64).rename({GROUP: OTHER})
        intersection = xr.dot(members, other, dim=component_dims, optimize=True)
        size_a, size_b = members.sum(component_dims), other.sum(component_dims)
    union = size_a + size_b - intersection
    return intersection / union.where(union > 0)


def _packed_overlaps(a: xr.DataArray, b: xr.DataArray, component_dims: list[str]
                     ) -> tuple[xr.DataArray, xr.DataArray, xr.DataArray]:
    """|a_g & b_h|, |a_g| and |b_h| of in-memory sets, from their members packed 64 to a word:
    a few machine instructions per 64 components and pair of groups, where a float product
    first converts every member of both to float64. Dims of `a` other than the group and the
    components (seeds, permutations) are repeated: `b` has them too."""
    repeated = [d for d in a.dims if d != GROUP and d not in component_dims]

    def packed(sets: xr.DataArray) -> np.ndarray:
        sets = sets.transpose(*repeated, GROUP, *component_dims)
        flat = sets.values.reshape(*sets.shape[:len(repeated) + 1], -1)
        bits = np.packbits(flat.astype(bool, copy=False), axis=-1)  # zero-padded to whole bytes
        return np.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, -bits.shape[-1] % 8)]).view(np.uint64)

    bits_a, bits_b = packed(a), packed(b)
    overlaps = np.stack([np.bitwise_count(bits_a[..., g, None, :] & bits_b).sum(axis=-1, dtype=np.int64)
                         for g in range(bits_a.shape[-2])], axis=-2)

    def along(values: np.ndarray, dims: tuple[str, ...], *sources: xr.DataArray) -> xr.DataArray:
        coords = {dim: source[GROUP].values for dim, source in zip(dims, sources)
                  if GROUP in source.coords}
        return xr.DataArray(values, dims=(*repeated, *dims), coords=coords)

    return (along(overlaps, (GROUP, OTHER), a, b),
            along(np.bitwise_count(bits_a).sum(axis=-1, dtype=np.int64), (GROUP,), a),
            along(np.bitwise_count(bits_b).sum(axis=-1, dtype=np.int64), (OTHER,), b))


def reliability(split_jaccard: xr.DataArray) -> xr.Dataset:
    """split_within[group], split_cross[group, other_group] and specificity_gap[group]."""
    groups = split_jaccard[GROUP].values
    same = xr.DataArray(groups[:, None] == groups[None, :], dims=(GROUP, OTHER))
    mean = split_jaccard.mean(SPLIT_SEED, skipna=True)
    within = mean.where(same).max(OTHER, skipna=True)  # the diagonal
    cross = mean.where(~same)
    return xr.Dataset({"split_within": within.drop_vars(OTHER, errors="ignore"),
                       "split_cross": cross,
                       "specificity_gap": within - cross.mean(OTHER, skipna=True)})


def label_permutations(labels: np.ndarray, count: int) -> np.ndarray:
    """labels[permutation, instruction]: each row the labels in a seeded random order."""
    return np.stack([labels[np.random.default_rng((PERMUTATION_SEED, k)).permutation(len(labels))]
                     for k in range(count)]) if count else np.empty((0, len(labels)), dtype=labels.dtype)


def null_comparison(gap: xr.DataArray, null_gap: xr.DataArray) -> xr.Dataset:
    """split_null_q95[group] and split_p[group]; NaN where the gap or every null gap is undefined
    (a group whose halves select nothing). Permutations whose gap is undefined do not count."""
    defined = null_gap.notnull()
    at_least = (null_gap >= gap).where(defined, False).sum(PERMUTATION)
    count = defined.sum(PERMUTATION)
    p = ((1 + at_least) / (1 + count)).where(gap.notnull() & (count > 0))
    q95 = null_gap.quantile(NULL_QUANTILE, dim=PERMUTATION, skipna=True).drop_vars("quantile")
    return xr.Dataset({"split_null_q95": q95, "split_p": p, "split_null_count": count})
