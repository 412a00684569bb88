"""Selection rules: each group's set of components from frequency[group, *components] (docs/method.md sections 2, 4a).

- The rule names are `sparcom.identification.schema.RULES`.
- `top_fraction_threshold(values, epsilon)`: the m-th largest value, m = max(1, ceil(eps*N - 1e-9)).
- `select(frequency, rule, ...)`: the boolean sets (`selected`, like `frequency`) and `threshold`.
  global_percentile: per group, p >= the m-th largest frequency of all layers, ties included (the
                     paper's rule); layer_percentile: the same within each layer;
  threshold:         p >= tau;
  contrastive:       per group, the margin s = p - (largest p of the other groups) at or above its
                     m-th largest value over all components;
  lape:              the entropy rule of the language-specific-neuron method (Tang et al. 2024),
                     thresholds global over all groups and components;
  attribution:       global_percentile's arithmetic on the group means of the estimates a of
                     switching a component off (docs/method.md section 6a), not on frequencies;
  attribution_contrastive: contrastive's arithmetic on those means, a - (largest a of the others).
  Every rule keeps only p > 0 (s > 0 for contrastive, a > 0 and its margin > 0 for the
  attribution rules): a never-active component is never selected, a component whose removal is
  estimated to help never either, and a group with fewer than m positive values selects just
  those (all negative: nothing).
- `select_by(frequency, settings, layer_dim)`: the same, with the rule and parameters of settings.
- `check_rule(settings, groups)`: refuse a rule that compares groups when there is only one.
- `component_dims(values)`: the dims a rule selects over (neither the group nor a repeated dim).
- `parameter_names(rule)`, `rule_parameters(settings or attrs)`: the parameters a rule uses.

Dims in `sparcom.identification.schema.REPEAT_DIMS` (split halves, seeds, permutations) repeat
the selection: each of their entries is selected on its own, as if alone (in memory only for lape).
Works on numpy- and Dask-backed arrays alike; on Dask every result stays lazy except lape's three
global scalars (k-th values over all groups and components), computed by a tree of top-k's.
"""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
import xarray as xr

from sparcom.identification.schema import COMPARING_RULES, GROUP, REPEAT_DIMS

EPSILON_TOLERANCE = 1e-9
# Percentile selection reads whole groups (all components of a group, or of a group's layer) in
# blocks of about this size.
SELECTION_BLOCK_BYTES = 64 * 2**20
# The m-th largest value of a row is searched near a bound from every this-many-th value.
SAMPLE_STRIDE = 64


def top_count(epsilon: float, n: int) -> int:
    """m of docs/method.md section 2: the number of values a fraction epsilon keeps, at least 1."""
    return max(1, math.ceil(epsilon * n - EPSILON_TOLERANCE))


def top_fraction_threshold(values: np.ndarray, epsilon: float) -> float:
    """The m-th largest value of `values` (flattened), m = max(1, ceil(epsilon * N - 1e-9))."""
    return float(_row_thresholds(np.reshape(values, (1, -1)), epsilon)[0])


def _row_thresholds(rows: np.ndarray, epsilon: float) -> np.ndarray:
    """The m-th largest value of every row (last axis)."""
    n = rows.shape[-1]
    m = top_count(epsilon, n)
    flat = rows.reshape(-1, n)
    return np.array([_mth_largest(row, m) for row in flat], dtype=rows.dtype).reshape(rows.shape[:-1])


def _mth_largest(row: np.ndarray, m: int):
    """The m-th largest value of a row, searched among the values at or above a bound that about
    2m of them reach, taken from every SAMPLE_STRIDE-th value: a partition of a few m values, not
    of the whole row. Exact: every value below the bound is below every candidate. Rows too short
    for a sample, or where fewer than m values reach the bound, are partitioned whole."""
    sample = row[::SAMPLE_STRIDE]
    above = 2 * m // SAMPLE_STRIDE
    if 0 < above <= len(sample) // 8:  # a bound that keeps most of the row saves nothing
        bound = np.partition(sample, len(sample) - above)[len(sample) - above]
        candidates = row[row >= bound]
        if len(candidates) >= m:
            return np.partition(candidates, len(candidates) - m)[len(candidates) - m]
    return np.partition(row, len(row) - m)[len(row) - m]


def _select_block(block: np.ndarray, n_core: int, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """Selection within every run of the last `n_core` axes of a block: (selected, threshold)."""
    leading = block.shape[:block.ndim - n_core]
    rows = block.reshape(*leading, -1)
    threshold = _row_thresholds(rows, epsilon)
    selected = rows >= threshold[..., None]
    # With fewer than m positive values the threshold is 0 (or a negative margin): only the
    # positive ones are kept. A positive threshold keeps only positive values anyway.
    low = threshold <= 0
    if low.any():
        selected[low] &= rows[low] > 0
    return selected.reshape(block.shape), threshold


def _whole_along(values: xr.DataArray, core: list[str]) -> xr.DataArray:
    """Rechunk so each block holds whole runs of the core dims, about SELECTION_BLOCK_BYTES."""
    if not values.chunks:
        return values
    run_bytes = values.dtype.itemsize * math.prod(values.sizes[d] for d in core)
    leading = [d for d in values.dims if d not in core]
    runs_per_block = max(1, SELECTION_BLOCK_BYTES // run_bytes)
    chunks = {d: -1 for d in core}
    for dim in reversed(leading):  # fill the innermost leading dims first
        chunks[dim] = min(values.sizes[dim], runs_per_block)
        runs_per_block = max(1, runs_per_block // values.sizes[dim])
    return values.chunk(chunks)


def _top_fraction(values: xr.DataArray, core: list[str], epsilon: float) -> xr.Dataset:
    selected, threshold = xr.apply_ufunc(
        _select_block, _whole_along(values, core), kwargs={"n_core": len(core), "epsilon": epsilon},
        input_core_dims=[core], output_core_dims=[core, []], dask="parallelized",
        output_dtypes=[bool, np.float64])
    return xr.Dataset({"selected": selected.transpose(*values.dims), "threshold": threshold})


def margin(frequency: xr.DataArray) -> xr.DataArray:
    """s_g(c) = p_g(c) - max over h != g of p_h(c): from the largest and the second-largest
    value per component, so it costs two reductions over groups, not one per group."""
    largest = frequency.max(GROUP)
    at_largest = frequency == largest
    runner_up = frequency.where(~at_largest).max(GROUP)  # NaN when every group ties at the top
    alone_on_top = at_largest & (at_largest.sum(GROUP) == 1)
    return frequency - xr.where(alone_on_top, runner_up, largest)


def _rank(n: int, rate: float) -> int:
    """round(n * rate) as the released script computes it (Python's round), kept within 1..n:
    the k-th smallest value needs k >= 1."""
    return min(n, max(1, round(n * rate)))


def _repeated(values: xr.DataArray) -> list[str]:
    return [d for d in values.dims if d in REPEAT_DIMS]


def component_dims(values: xr.DataArray) -> list[str]:
    return [d for d in values.dims if d != GROUP and d not in REPEAT_DIMS]


def kth_smallest(values: xr.DataArray, k: int) -> float | xr.DataArray:
    """The k-th smallest (1-based) of all values, as torch.kthvalue gives it; with repeated dims,
    of each entry's values (in memory). On Dask a tree of top-k's over the blocks, from whichever
    end of the sorted values is nearer."""
    repeated = _repeated(values)
    if repeated:
        moved = values.transpose(*repeated, ...)
        rows = moved.values.reshape(math.prod(moved.shape[:len(repeated)]), -1)
        kth = np.partition(rows, k - 1, axis=-1)[:, k - 1]
        return xr.DataArray(kth.reshape(moved.shape[:len(repeated)]), dims=repeated)
    data = values.data
    n = data.size
    if not isinstance(data, da.Array):
        return float(np.partition(data.ravel(), k - 1)[k - 1])
    flat = da.concatenate([block.ravel() for block in data.blocks.ravel()])
    if k <= n - k + 1:
        return float(da.topk(flat, -k).max().compute())
    return float(da.topk(flat, n - k + 1).min().compute())


def entropy(frequency: xr.DataArray) -> xr.DataArray:
    """H(c) = -sum_g q_g ln q_g, q_g = p_g / sum_h p_h (0 where the sum is 0; 0 ln 0 = 0), float64."""
    p = frequency.astype(np.float64, copy=False)
    # Nothing is NaN here: plain sums (xarray's default skips NaN, at the cost of a masked copy).
    total = p.sum(GROUP, skipna=False)
    q = (p / total.where(total > 0)).fillna(0.0)
    return -(q * np.log(q.where(q > 0, 1.0))).sum(GROUP, skipna=False)


def lape(frequency: xr.DataArray, top_rate: float, filter_rate: float, bar_ratio: float) -> xr.Dataset:
    """The LAPE rule, transcribed from `identify.py` of github.com/RUCAIBox/Language-Specific-Neurons
    (commit 4eb5ea3, "Setting top_rate to default value": top_rate 0.01, filter_rate 0.95,
    activation_bar_ratio 0.95), with languages replaced by groups. Where docs/method.md section 4a differs from
    the script it is said on the line: float64 instead of float32, ties at the entropy boundary
    kept (the script's topk picks exactly k), and never a non-candidate (the script's topk
    takes infinite-entropy ones when there are fewer than k candidates)."""
    components = component_dims(frequency)
    n_components = math.prod(frequency.sizes[d] for d in components)
    n_values = n_components * frequency.sizes[GROUP]
    # entropy = -sum(normed_activation_probs * log_probs); normed = probs / probs.sum(-1); nan -> 0
    h = entropy(frequency)
    # top_prob_value = flattened_probs.kthvalue(round(len(flattened_probs) * filter_rate))
    filter_value = kth_smallest(frequency, _rank(n_values, filter_rate))
    # top_position = (activation_probs > top_prob_value).sum(-1); entropy[top_position == 0] = inf
    candidate = (frequency > filter_value).any(GROUP)
    # flattened_entropy.topk(round(len(flattened_entropy) * top_rate), largest=False)
    keep = max(1, round(n_components * top_rate))
    cutoff = kth_smallest(h.where(candidate, np.inf), min(keep, n_components))
    kept = candidate & (h <= cutoff)  # ties at the cutoff kept; cutoff inf: every candidate
    # activation_bar = flattened_probs.kthvalue(round(len(flattened_probs) * activation_bar_ratio))
    bar = kth_smallest(frequency, _rank(n_values, bar_ratio))
    # lang, indice = torch.where(selected_probs > activation_bar); bar >= 0, so p > 0 holds
    selected = (kept & (frequency > bar)).transpose(*frequency.dims)
    threshold = xr.zeros_like(frequency[{d: 0 for d in components}].drop_vars(
        components, errors="ignore"), dtype=np.float64) + bar
    threshold.attrs = {"meaning": "activation bar", "kept_before_bar": keep}
    if not _repeated(frequency):
        threshold.attrs.update(filter_value=filter_value, entropy_cutoff=cutoff)
    return xr.Dataset({"selected": selected, "threshold": threshold})


def select(frequency: xr.DataArray, rule: str, epsilon: float = 0.01, tau: float = 0.5,
           layer_dim: str = "layer", top_rate: float = 0.01, filter_rate: float = 0.95,
           bar_ratio: float = 0.95) -> xr.Dataset:
    """`selected` (boolean, like `frequency`) and `threshold` (per group; per group and layer
    for layer_percentile). Lazy when `frequency` is (lape computes its three scalars). For the
    attribution rules `frequency` holds the group means of the estimates."""
    components = component_dims(frequency)
    if rule == "threshold":
        first = frequency[{d: 0 for d in components}].drop_vars(components, errors="ignore")
        return xr.Dataset({"selected": (frequency >= tau) & (frequency > 0),
                           "threshold": xr.full_like(first, tau, dtype=np.float64)})
    if rule in ("global_percentile", "attribution"):
        return _top_fraction(frequency, components, epsilon)
    if rule == "layer_percentile":
        return _top_fraction(frequency, [d for d in components if d != layer_dim], epsilon)
    if rule in ("contrastive", "attribution_contrastive"):
        return _top_fraction(margin(frequency), components, epsilon)
    if rule == "lape":
        return lape(frequency, top_rate, filter_rate, bar_ratio)
    raise ValueError(f"unknown selection rule {rule!r}")


def select_by(frequency: xr.DataArray, settings, layer_dim: str) -> xr.Dataset:
    """`select` with the rule and parameters of an IdentificationSettings."""
    return select(frequency, settings.rule, settings.epsilon, settings.tau, layer_dim,
                  settings.top_rate, settings.filter_rate, settings.bar_ratio)


def check_rule(settings, groups) -> None:
    if settings.rule in COMPARING_RULES and len(groups) < 2:
        raise ValueError(f"rule {settings.rule!r} compares groups, but grouping by "
                         f"{settings.group_by!r} gives {len(groups)} group(s): {list(groups)}")


def parameter_names(rule: str) -> tuple[str, ...]:
    """The parameters a rule uses; the others are inert for it."""
    return {"threshold": ("tau",), "lape": ("top_rate", "filter_rate", "bar_ratio")}.get(rule, ("epsilon",))


def rule_parameters(settings) -> dict:
    """The rule's parameters and their values, from settings or from a result's attributes."""
    get = settings.get if isinstance(settings, dict) else lambda name: getattr(settings, name)
    return {name: get(name) for name in parameter_names(get("rule"))}
