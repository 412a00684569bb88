"""Fidelity: do the first-order estimates of switching components off (docs/method.md section 6a)
predict what switching them off does? Measured on the ablation's own evaluation records, with the
estimates computed there with the same scored response tokens K.

- `measures_fidelity(rule, settings)`: whether an ablation measures it: `settings.fidelity`, or
  where that is None (the default), when the components were selected by an attribution rule.
- `set_estimates(estimates, sets, groups, labels, evaluated)`: set_estimate[ablated, evaluated],
  the mean over the evaluated group's records of the sum of the ablated set's estimates: the
  estimate of delta[ablated, evaluated], averaged as delta is.
- `choose_probes(mean_estimate, count, rng)`: the single components switched off one at a time:
  half of `count` drawn with the seed from the 2 x that many strongest positive mean estimates,
  half from the strongest negative ones (a sign with too few gives its place to the other).
- `rank_correlation(x, y)`: Spearman's rho (Pearson's r of average ranks); `sign_agreement(x, y)`:
  the share of pairs with the same sign (zero is a sign of its own).
- `record_estimates(model, records, family, max_response_tokens, extraction, cache_dir)`: the
  records' estimates (`sparcom.attribution.estimate.attribute_records`) on the model loaded here.
- `probe_records(labels, per_group)`: the records the probes are measured and estimated on: the
  first `per_group` of each group (None: all, `fidelity_per_group: null`).
- `probe_sets(estimates, settings)`: the probes as masks, chosen on the probe records' estimates,
  each one more pass of the ablation (`sparcom.ablation.passes`) over those records, run with the
  stage's own passes.
- `fidelity_dataset(family, sets, labels, evaluated, estimates, probes, probe_base, probe_nll, settings)`:
  the named variables (below) from the estimates and the probes' measured NLLs.

Variables added to ablation.zarr (nats per token, as delta):
  set_estimate[ablated, evaluated]            estimate of delta[ablated, evaluated]
  probe_estimate[probe], probe_delta[probe]   each probe's mean estimate and measured mean
                                              nll - probe_nll_base over the probe records;
  probe_nll_base[instruction], probe_nll[probe, instruction]
                                              the NLLs measured intact and with the probe
                                              switched off (NaN off the probe records);
  probe_<dim>[probe]                          the probe's place (true layer index, then the
                                              family's other dims, e.g. probe_layer, probe_neuron)
  fidelity_rank_correlation, fidelity_sign_agreement: within the probes, each with `*_ci[bound]`,
  a seeded 95% bootstrap interval over probes (`settings.resamples`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import xarray as xr

from sparcom.ablation.schema import ABLATED, BOUND, EVALUATED, INSTRUCTION, PROBE
from sparcom.ablation.settings import AblationSettings
from sparcom.ablation.statistics import LEVEL, group_weights
from sparcom.identification.schema import ATTRIBUTION_RULES, Family

if TYPE_CHECKING:  # the model stage's types: imported where it runs
    from sparcom.curation.records import InstructionRecord
    from sparcom.extraction.settings import ExtractionSettings, ModelSettings

# The probes' seed stream, apart from the controls' (seed, group, control, draw) streams.
PROBE_STREAM = 24
MEANINGS = {  # each variable's `meaning` attribute in ablation.zarr
    "set_estimate": "mean over the evaluated group's records of the sum of the ablated set's attribution "
                    "estimates (nats per token): the first-order estimate of delta[ablated, evaluated]",
    "probe_estimate": "a single component's attribution estimate, mean over the probe records",
    "probe_delta": "measured probe_nll - probe_nll_base with that component alone switched off, mean over the "
                   "probe records",
    "probe_nll_base": "response NLL of each probe record intact, measured in the probes' batches (NaN off them)",
    "probe_nll": "response NLL of each probe record with the probe switched off (NaN off the probe records)",
    "fidelity_rank_correlation": "Spearman's rho of probe_estimate and probe_delta over the probes",
    "fidelity_sign_agreement": "share of probes whose estimate and measured delta have the same sign",
}


def measures_fidelity(rule: str | None, settings: AblationSettings) -> bool:
    return settings.fidelity if settings.fidelity is not None else rule in ATTRIBUTION_RULES


def set_estimates(estimates: xr.DataArray, sets: dict[str, xr.DataArray], groups: Sequence[str],
                  labels: np.ndarray, evaluated: Sequence[str]) -> xr.DataArray:
    """estimates[instruction, *component dims] -> set_estimate[ablated, evaluated] (float64)."""
    dims = [d for d in estimates.dims if d != INSTRUCTION]
    values = estimates.values.astype(np.float64).reshape(estimates.sizes[INSTRUCTION], -1)
    masks = np.stack([sets[g].transpose(*dims).values.reshape(-1) for g in groups]).astype(np.float64)
    per_record = xr.DataArray(masks @ values.T, dims=(ABLATED, INSTRUCTION), coords={ABLATED: list(groups)})
    return xr.dot(per_record, group_weights(labels, list(evaluated)), dim=INSTRUCTION)


def choose_probes(mean_estimate: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Flat indices into `mean_estimate`: the positive probes first, strongest first, then the negative."""
    flat = np.asarray(mean_estimate, dtype=np.float64).ravel()
    positive = np.flatnonzero(flat > 0)
    negative = np.flatnonzero(flat < 0)
    positive = positive[np.argsort(-flat[positive], kind="stable")]
    negative = negative[np.argsort(flat[negative], kind="stable")]
    wanted_positive = min(len(positive), max(count // 2, count - len(negative)))
    wanted_negative = min(len(negative), count - wanted_positive)
    chosen = []
    for pool, wanted in ((positive, wanted_positive), (negative, wanted_negative)):
        drawn = rng.choice(pool[:2 * wanted], size=wanted, replace=False) if wanted else pool[:0]
        chosen.append(drawn[np.argsort(-np.abs(flat[drawn]), kind="stable")])
    return np.concatenate(chosen)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    unique, inverse = np.unique(values, return_inverse=True)
    return (np.bincount(inverse, weights=ranks) / np.bincount(inverse))[inverse] if len(unique) < len(values) else ranks


def rank_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho; NaN with fewer than two pairs or where either side is constant."""
    if len(x) < 2:
        return float("nan")
    rx, ry = _average_ranks(np.asarray(x)), _average_ranks(np.asarray(y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    scale = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / scale) if scale > 0 else float("nan")


def sign_agreement(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.sign(x) == np.sign(y))) if len(x) else float("nan")


def _bootstrap_interval(x: np.ndarray, y: np.ndarray, figure: Callable[[np.ndarray, np.ndarray], float],
                        resamples: int, rng: np.random.Generator) -> np.ndarray:
    """The 95% percentile interval of `figure` over probes redrawn with replacement."""
    if len(x) < 2:
        return np.full(2, np.nan)
    drawn = rng.integers(len(x), size=(resamples, len(x)))
    samples = np.array([figure(x[d], y[d]) for d in drawn])
    tail = (1 - LEVEL) / 2
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
        return np.nanquantile(samples, [tail, 1 - tail])


def probe_records(labels: np.ndarray, per_group: int | None) -> list[int] | None:
    """Indices of the first `per_group` records of each group, in record order; None for all."""
    if per_group is None:
        return None
    seen: dict[str, int] = {}
    chosen = []
    for index, label in enumerate(labels):
        if seen.setdefault(str(label), 0) < per_group:
            chosen.append(index)
            seen[str(label)] += 1
    return None if len(chosen) == len(labels) else chosen


def probe_sets(estimates: xr.DataArray, settings: AblationSettings) -> list[np.ndarray]:
    """The probes (`choose_probes` on the given records' mean estimates, seeded by `settings.seed`),
    each a boolean mask over the component dims with its one component switched off."""
    dims = [d for d in estimates.dims if d != INSTRUCTION]
    mean_estimate = estimates.transpose(INSTRUCTION, *dims).values.astype(np.float64).mean(axis=0)
    masks = []
    for flat in choose_probes(mean_estimate, settings.fidelity_probes, np.random.default_rng([settings.seed, PROBE_STREAM])):
        mask = np.zeros(mean_estimate.shape, dtype=bool)
        mask.flat[flat] = True
        masks.append(mask)
    return masks


def fidelity_dataset(family: Family, sets: dict[str, xr.DataArray], labels: np.ndarray, evaluated: Sequence[str],
                     estimates: xr.DataArray, probes: list[np.ndarray], probe_base: np.ndarray,
                     probe_nll: Sequence[np.ndarray], settings: AblationSettings) -> xr.Dataset:
    """The variables of the module docstring. `estimates[instruction, *component dims]` are the
    records' estimates, `sets` the groups' sets (in group order), `probes` the masks of
    `probe_sets`, `probe_base[instruction]` the intact NLLs of the probe records (NaN elsewhere:
    which records are the probe records) and `probe_nll[probe, instruction]` the NLLs measured
    with each switched off."""
    dims = [d for d in estimates.dims if d != INSTRUCTION]
    estimates = estimates.transpose(INSTRUCTION, *dims)
    probe_base = np.asarray(probe_base, dtype=np.float64)
    measured = np.isfinite(probe_base)
    mean_estimate = estimates.values[measured].astype(np.float64).mean(axis=0)
    flat = np.array([int(np.flatnonzero(mask)[0]) for mask in probes], dtype=np.int64)
    estimate = mean_estimate.ravel()[flat]
    nll = np.asarray(probe_nll, dtype=np.float64).reshape(len(probes), len(probe_base))
    delta = (nll[:, measured] - probe_base[None, measured]).mean(axis=1)
    places = np.unravel_index(flat, mean_estimate.shape)
    coords = {f"{PROBE}_{dim}": (PROBE, (estimates[dim].values[place] if dim in estimates.coords else place)
                                 .astype(np.int64)) for dim, place in zip(dims, places)}
    rng = np.random.default_rng([settings.seed, PROBE_STREAM, 1])
    interval = {name: _bootstrap_interval(estimate, delta, figure, settings.resamples, rng)
                for name, figure in (("rank_correlation", rank_correlation), ("sign_agreement", sign_agreement))}
    variables = {
        "set_estimate": (set_estimates(estimates, sets, list(sets), labels, evaluated), MEANINGS["set_estimate"]),
        "probe_estimate": ((PROBE, estimate), MEANINGS["probe_estimate"]),
        "probe_delta": ((PROBE, delta), MEANINGS["probe_delta"]),
        "probe_nll_base": ((INSTRUCTION, probe_base), MEANINGS["probe_nll_base"]),
        "probe_nll": (((PROBE, INSTRUCTION), nll), MEANINGS["probe_nll"]),
        "fidelity_rank_correlation": (rank_correlation(estimate, delta), MEANINGS["fidelity_rank_correlation"]),
        "fidelity_rank_correlation_ci": ((BOUND, interval["rank_correlation"]), "95% bootstrap interval over probes"),
        "fidelity_sign_agreement": (sign_agreement(estimate, delta), MEANINGS["fidelity_sign_agreement"]),
        "fidelity_sign_agreement_ci": ((BOUND, interval["sign_agreement"]), "95% bootstrap interval over probes"),
    }
    dataset = xr.Dataset({name: value for name, (value, _) in variables.items()},
                         coords={**coords, BOUND: ["low", "high"], EVALUATED: list(evaluated)})
    for name, (_, meaning) in variables.items():
        dataset[name].attrs = {"meaning": meaning, "family": family.name}
    return dataset


def record_estimates(model: ModelSettings, records: Sequence[InstructionRecord], family: Family,
                     max_response_tokens: int | None, extraction: ExtractionSettings, cache_dir: Path) -> xr.DataArray:
    """The family's estimates[instruction, ...] of the records, scored on their first
    `max_response_tokens` response tokens as the ablation scores them, on the model loaded here."""
    from sparcom.attribution.estimate import attribute_records
    from sparcom.core.models import load_model, resolve_model

    loaded = load_model(resolve_model(model.name, model.revision, model.trust_remote_code), cache_dir,
                        extraction.dtype, extraction.device, model.trust_remote_code, model.device_map,
                        model.max_memory)
    return attribute_records(loaded, records, max_response_tokens, extraction)[family.attribution]
