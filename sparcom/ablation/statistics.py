"""The figures of an ablation and the tests on them, over records (docs/method.md section 6).

- `group_weights(labels, groups)`: weights[instruction, evaluated] that average over each group's
  records; `bootstrap_weights(labels, groups, resamples, seed)`: the same for every bootstrap
  resample (records redrawn with replacement within each group), so any per-record quantity's
  group means over all resamples are one named-dim contraction.
- `sign_flip_test(differences, permutations, rng)`: one-sided sign-flip permutation test of a mean
  of per-record differences above 0, every sign pattern enumerated up to `EXACT_SIGN_FLIPS`
  records: (p, the smallest p the test can reach).
- `two_sample_test(own, others, permutations, rng)`: one-sided permutation test of mean(own) -
  mean(others) above 0, records relabelled (group sizes kept), every split enumerated where
  there are at most `permutations`: (p, the smallest p the test can reach).
- `holm(p_values)`: Holm's step-down adjustment (None entries are no test and stay None).
- `paired_difference(before, after, resamples, permutations, seed)`: the mean of after - before
  over the records both have (by key), its bootstrap interval and two-sided sign-flip p.
- `ablation_figures(nll_base, nll, nll_control, labels, resamples, permutations, seed)`:
  delta[ablated, evaluated] = mean over the evaluated group's records of nll - nll_base;
  records[evaluated]; delta_other[ablated] = mean over the records of the other groups that have
  components (h != g; evaluated categories without components are left out, reported apart);
  delta_control[control, ablated, evaluated] (mean over seeds; NaN where a control was not
  measured on the evaluated group's records: only the own group's are compared); the differences that decide
  (docs/method.md section 6b): control_difference[control, g] = delta[g, g] - delta_control[control,
  g, g] with control_p_value and control_min_p (sign flips of g's per-record differences nll -
  mean over seeds of nll_control), specific_difference[g] = delta[g, g] - delta_other[g] with
  specific_p_value and specific_min_p (two-sample test, g's records against the others');
  the ratios, description only: specificity[g] = delta[g, g] / delta_other[g], control_ratio[control,
  g] = delta[g, g] / delta_control[control, g, g]. Every figure has a 95% percentile bootstrap
  interval (`*_ci`, dim `bound`) from the same resamples.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from itertools import combinations
from math import comb

import numpy as np
import xarray as xr

from sparcom.ablation.schema import ABLATED, BOUND, CONTROL, EVALUATED, INSTRUCTION, RESAMPLE, SEED

LEVEL = 0.95
# Up to this many records every sign pattern is enumerated (2^16 = 65,536): the p-value is exact.
EXACT_SIGN_FLIPS = 16
# Floating-point slack when a permuted statistic equals the observed one (ties count as >=).
TIE = 1e-12


def group_weights(labels: np.ndarray, groups: list[str]) -> xr.DataArray:
    member = (np.asarray(labels)[:, None] == np.asarray(groups)[None, :]).astype(np.float64)
    return xr.DataArray(member / member.sum(axis=0, keepdims=True), dims=(INSTRUCTION, EVALUATED),
                        coords={EVALUATED: groups})


def bootstrap_weights(labels: np.ndarray, groups: list[str], resamples: int, seed: int) -> xr.DataArray:
    rng = np.random.default_rng(seed)
    weights = np.zeros((resamples, len(labels), len(groups)))
    for g, group in enumerate(groups):
        members = np.flatnonzero(np.asarray(labels) == group)
        drawn = rng.integers(len(members), size=(resamples, len(members)))
        for r in range(resamples):
            np.add.at(weights[r, :, g], members[drawn[r]], 1.0 / len(members))
    return xr.DataArray(weights, dims=(RESAMPLE, INSTRUCTION, EVALUATED), coords={EVALUATED: groups})


def sign_flip_test(differences: np.ndarray, permutations: int, rng: np.random.Generator) -> tuple[float, float]:
    """H0: the differences are symmetric about 0. p = share of sign patterns whose mean is >= the
    observed mean (all 2^n patterns up to EXACT_SIGN_FLIPS records; else (1 + count) / (1 +
    permutations) over random patterns). The smallest reachable p is 2^-n (or 1 / (1 + permutations))."""
    differences = np.asarray(differences, dtype=np.float64)
    n = len(differences)
    if n == 0:
        return float("nan"), float("nan")
    observed = differences.mean()
    if n <= EXACT_SIGN_FLIPS:
        signs = 1.0 - 2.0 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
        return float(np.mean(signs @ differences / n >= observed - TIE)), 2.0 ** -n
    signs = rng.choice([-1.0, 1.0], size=(permutations, n))
    count = int(np.sum(signs @ differences / n >= observed - TIE))
    return (1 + count) / (1 + permutations), max(2.0 ** -n, 1 / (1 + permutations))


def two_sample_test(own: np.ndarray, others: np.ndarray, permutations: int,
                    rng: np.random.Generator) -> tuple[float, float]:
    """H0: own and others' records are exchangeable. p = share of the splits of the pooled records
    into n_own and n_other (all C(n_own + n_other, n_own) where there are at most `permutations`;
    else (1 + count) / (1 + permutations) over random splits) whose difference of means is >= the
    observed one. The smallest reachable p is 1 / C(n_own + n_other, n_own) (or 1 / (1 + permutations))."""
    pooled = np.concatenate([np.asarray(own, dtype=np.float64), np.asarray(others, dtype=np.float64)])
    n_own, n = len(own), len(pooled)
    if n_own == 0 or n_own == n:
        return float("nan"), float("nan")
    total = pooled.sum()

    def difference(own_sums: np.ndarray) -> np.ndarray:
        return own_sums / n_own - (total - own_sums) / (n - n_own)

    observed = difference(np.asarray(pooled[:n_own].sum()))
    splits = comb(n, n_own)
    if splits <= permutations:
        chosen = np.array(list(combinations(range(n), n_own)))
        return float(np.mean(difference(pooled[chosen].sum(axis=1)) >= observed - TIE)), 1 / splits
    drawn = np.argsort(rng.random((permutations, n)), axis=1)[:, :n_own]
    count = int(np.sum(difference(pooled[drawn].sum(axis=1)) >= observed - TIE))
    return (1 + count) / (1 + permutations), max(1 / splits, 1 / (1 + permutations))


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's adjustment over the tests present: the i-th smallest of m p-values becomes
    max over j <= i of min(1, (m - j + 1) p_(j))."""
    present = sorted((p, i) for i, p in enumerate(p_values) if p is not None and not np.isnan(p))
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (len(present) - rank) * p))
        adjusted[i] = running
    return adjusted


def paired_difference(before: dict[str, float], after: dict[str, float], resamples: int = 1000,
                      permutations: int = 10000, seed: int | Sequence[int] = 0) -> dict:
    """{"value", "low", "high", "p_value", "min_p", "records"} of after - before on the shared keys;
    p two-sided: twice the smaller one-sided sign-flip p (at most 1)."""
    shared = sorted(set(before) & set(after))
    differences = np.array([after[k] - before[k] for k in shared], dtype=np.float64)
    if not len(differences):
        return {"value": None, "low": None, "high": None, "p_value": None, "min_p": None, "records": 0}
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(len(differences), size=(resamples, len(differences)))].mean(axis=1)
    tail = (1 - LEVEL) / 2
    up, min_p = sign_flip_test(differences, permutations, rng)
    down, _ = sign_flip_test(-differences, permutations, rng)
    return {"value": float(differences.mean()), "low": float(np.quantile(means, tail)),
            "high": float(np.quantile(means, 1 - tail)), "p_value": min(1.0, 2 * min(up, down)),
            "min_p": min(1.0, 2 * min_p), "records": len(differences)}


def _own(values: xr.DataArray) -> xr.DataArray:
    """values[..., ablated g, evaluated g]: each ablated group on its own records."""
    return values.sel({EVALUATED: values[ABLATED]}).drop_vars(EVALUATED)


def _others(values: xr.DataArray, records: xr.DataArray, groups: list[str]) -> xr.DataArray:
    """The mean over the records of the groups with components other than g (each group's mean
    weighted by its records: resampling within groups keeps the counts); NaN without such records."""
    weights = xr.DataArray(
        [[float(records.sel({EVALUATED: h})) if h in groups and h != g else 0.0 for h in values[EVALUATED].values]
         for g in values[ABLATED].values], dims=(ABLATED, EVALUATED))
    total = weights.sum(EVALUATED)
    return xr.dot(values, weights, dim=EVALUATED) / total.where(total > 0)


def _interval(samples: xr.DataArray) -> xr.DataArray:
    """Percentile interval over resamples; NaN where every resample is NaN (a ratio of zeros)."""
    tail = (1 - LEVEL) / 2
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
        quantiles = samples.quantile([tail, 1 - tail], dim=RESAMPLE, skipna=True)
    return quantiles.rename(quantile=BOUND).assign_coords({BOUND: ["low", "high"]})


def _ratio(a: xr.DataArray, b: xr.DataArray) -> xr.DataArray:
    return a / b.where(b != 0)


def _record_tests(change: xr.DataArray, change_control: xr.DataArray, labels: np.ndarray, groups: list[str],
                  permutations: int, seed: int) -> xr.Dataset:
    """The permutation tests of each ablated group on its own records: against each control (sign
    flips) and against the other groups' records (two-sample), each with its smallest reachable p."""
    controls = [str(c) for c in change_control[CONTROL].values]
    control_p = np.full((len(controls), len(groups)), np.nan)
    control_min = np.full_like(control_p, np.nan)
    specific_p = np.full(len(groups), np.nan)
    specific_min = np.full_like(specific_p, np.nan)
    for g, group in enumerate(groups):
        own = labels == group
        others = np.isin(labels, groups) & ~own
        changes = change.sel({ABLATED: group}).values
        for c, control in enumerate(controls):
            differences = changes[own] - change_control.sel({CONTROL: control, ABLATED: group}).values[own]
            control_p[c, g], control_min[c, g] = sign_flip_test(
                differences, permutations, np.random.default_rng([seed, 0, g, c]))
        specific_p[g], specific_min[g] = two_sample_test(changes[own], changes[others], permutations,
                                                         np.random.default_rng([seed, 1, g]))
    at = {CONTROL: controls, ABLATED: groups}
    return xr.Dataset({
        "control_p_value": ((CONTROL, ABLATED), control_p), "control_min_p": ((CONTROL, ABLATED), control_min),
        "specific_p_value": (ABLATED, specific_p), "specific_min_p": (ABLATED, specific_min)}, coords=at)


def ablation_figures(
    nll_base: xr.DataArray, nll: xr.DataArray, nll_control: xr.DataArray, labels: np.ndarray,
    resamples: int = 1000, permutations: int = 10000, seed: int = 0,
) -> xr.Dataset:
    """nll_base[instruction], nll[ablated, instruction], nll_control[control, seed, ablated,
    instruction]; labels: each instruction's evaluated group."""
    labels = np.array([str(label) for label in labels])
    groups = [str(g) for g in nll[ABLATED].values]
    evaluated = groups + sorted(set(labels) - set(groups))
    mean = group_weights(labels, evaluated)
    boot = bootstrap_weights(labels, evaluated, resamples, seed)
    records = xr.DataArray([int(np.sum(labels == e)) for e in evaluated], dims=EVALUATED,
                           coords={EVALUATED: evaluated})
    change = (nll - nll_base).assign_coords({ABLATED: groups})
    change_control = (nll_control - nll_base).mean(SEED, skipna=False).assign_coords({ABLATED: groups})
    delta = xr.dot(change, mean, dim=INSTRUCTION)
    # A control measured on its group's own records only (`control_records: own`): NaN elsewhere.
    unmeasured = xr.dot(change_control.isnull().astype(np.float64), mean, dim=INSTRUCTION) > 0
    delta_control = xr.dot(change_control.fillna(0.0), mean, dim=INSTRUCTION).where(~unmeasured)
    boot_delta = xr.dot(change, boot, dim=INSTRUCTION)
    boot_control = xr.dot(change_control.fillna(0.0), boot, dim=INSTRUCTION).where(~unmeasured)
    other, boot_other = _others(delta, records, groups), _others(boot_delta, records, groups)
    result = xr.Dataset({
        "records": records,
        "delta": delta,
        "delta_ci": _interval(boot_delta),
        "delta_other": other,
        "delta_other_ci": _interval(boot_other),
        "delta_control": delta_control,
        "delta_control_ci": _interval(boot_control),
        "control_difference": _own(delta) - _own(delta_control),
        "control_difference_ci": _interval(_own(boot_delta) - _own(boot_control)),
        "specific_difference": _own(delta) - other,
        "specific_difference_ci": _interval(_own(boot_delta) - boot_other),
        "specificity": _ratio(_own(delta), other),
        "specificity_ci": _interval(_ratio(_own(boot_delta), boot_other)),
        "control_ratio": _ratio(_own(delta), _own(delta_control)),
        "control_ratio_ci": _interval(_ratio(_own(boot_delta), _own(boot_control))),
    }).merge(_record_tests(change, change_control, labels, groups, permutations, seed))
    return result.transpose(CONTROL, ABLATED, EVALUATED, BOUND, missing_dims="ignore")
