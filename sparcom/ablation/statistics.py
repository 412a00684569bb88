"""The figures of an ablation, with intervals over records (docs/method.md section 6).

- `group_weights(labels, groups)`: weights[instruction, evaluated] that average over each group's
  records; `bootstrap_weights(labels, groups, resamples, seed)`: the same for every bootstrap
  resample (records redrawn with replacement within each group), so any per-record quantity's
  group means over all resamples are one named-dim contraction.
- `ablation_figures(nll_base, nll, nll_control, labels, resamples, permutations, seed)`:
  delta[ablated, evaluated] = mean over the evaluated group's records of nll - nll_base;
  delta_other[ablated] = mean over the other groups h != g of delta[g, h];
  delta_control[control, ablated, evaluated] (mean over seeds);
  specificity[g] = delta[g, g] / delta_other[g]; control_ratio[control, g] = delta[g, g] /
  delta_control[control, g, g]; each with a 95% percentile interval (`*_ci`, dim `bound`), and
  control_p_value[control, g]: a one-sided sign-flip permutation test over g's records of
  nll[g] - mean over seeds of nll_control[control, g] (H0: no larger than the control).
"""

from __future__ import annotations

import warnings

import numpy as np
import xarray as xr

from sparcom.ablation.schema import ABLATED, BOUND, CONTROL, EVALUATED, INSTRUCTION, RESAMPLE, SEED

LEVEL = 0.95


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


def _own(values: xr.DataArray) -> xr.DataArray:
    """values[..., ablated g, evaluated g]: each ablated group on its own records."""
    return values.sel({EVALUATED: values[ABLATED]}).drop_vars(EVALUATED)


def _other(values: xr.DataArray) -> xr.DataArray:
    n = values.sizes[EVALUATED]
    return (values.sum(EVALUATED) - _own(values)) / (n - 1) if n > 1 else xr.full_like(_own(values), np.nan)


def _interval(samples: xr.DataArray) -> xr.DataArray:
    """Percentile interval over resamples; NaN where every resample is NaN (a ratio of zeros)."""
    tail = (1 - LEVEL) / 2
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
        quantiles = samples.quantile([tail, 1 - tail], dim=RESAMPLE, skipna=True)
    return quantiles.rename(quantile=BOUND).assign_coords({BOUND: ["low", "high"]})


def _ratio(a: xr.DataArray, b: xr.DataArray) -> xr.DataArray:
    return a / b.where(b != 0)


def sign_flip_p_value(differences: xr.DataArray, permutations: int, seed: int) -> xr.DataArray:
    """One-sided: (1 + #{mean of sign-flipped differences >= observed mean}) / (1 + permutations),
    over the `instruction` dim (NaN entries are records outside the group and are left out)."""
    rng = np.random.default_rng(seed)
    valid = differences.notnull()
    filled = differences.fillna(0.0)
    count = valid.sum(INSTRUCTION)
    observed = filled.sum(INSTRUCTION) / count
    signs = xr.DataArray(rng.choice([-1.0, 1.0], size=(permutations, differences.sizes[INSTRUCTION])),
                         dims=("permutation", INSTRUCTION))
    flipped = xr.dot(signs, filled, dim=INSTRUCTION) / count
    return (1 + (flipped >= observed - 1e-12).sum("permutation")) / (1 + permutations)


def ablation_figures(
    nll_base: xr.DataArray, nll: xr.DataArray, nll_control: xr.DataArray, labels: np.ndarray,
    resamples: int = 1000, permutations: int = 10000, seed: int = 0,
) -> xr.Dataset:
    """nll_base[instruction], nll[ablated, instruction], nll_control[control, seed, ablated,
    instruction]; labels: each instruction's evaluated group."""
    groups = [str(g) for g in nll[ABLATED].values]
    evaluated = groups + sorted({str(x) for x in labels} - set(groups))
    mean = group_weights(labels, evaluated)
    boot = bootstrap_weights(labels, evaluated, resamples, seed)
    change = nll - nll_base
    change_control = (nll_control - nll_base).mean(SEED)
    delta = xr.dot(change, mean, dim=INSTRUCTION)
    delta_control = xr.dot(change_control, mean, dim=INSTRUCTION)
    boot_delta = xr.dot(change, boot, dim=INSTRUCTION)
    boot_control = xr.dot(change_control, boot, dim=INSTRUCTION)
    own_records = xr.DataArray(np.asarray(labels)[None, :] == np.asarray(groups)[:, None],
                               dims=(ABLATED, INSTRUCTION), coords={ABLATED: groups})
    result = xr.Dataset({
        "delta": delta,
        "delta_ci": _interval(boot_delta),
        "delta_other": _other(delta),
        "delta_other_ci": _interval(_other(boot_delta)),
        "delta_control": delta_control,
        "delta_control_ci": _interval(boot_control),
        "specificity": _ratio(_own(delta), _other(delta)),
        "specificity_ci": _interval(_ratio(_own(boot_delta), _other(boot_delta))),
        "control_ratio": _ratio(_own(delta), _own(delta_control)),
        "control_ratio_ci": _interval(_ratio(_own(boot_delta), _own(boot_control))),
        "control_p_value": sign_flip_p_value((nll - nll_control.mean(SEED)).where(own_records),
                                             permutations, seed),
    })
    return result.transpose(CONTROL, ABLATED, EVALUATED, BOUND, missing_dims="ignore")
