"""Percentile selection on rows long enough for the sampled bound (sparcom.identification.rules.SAMPLE_STRIDE):
the same sets and thresholds as the plain-sort reference of tests/references.py, also where the
bound misses, where fewer than m values are positive, and on negative margins."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr

from sparcom.identification.rules import SAMPLE_STRIDE, select

from references import naive_rule

N = 40 * SAMPLE_STRIDE * 8  # components per group: sampled for every epsilon below


def frequencies(values: np.ndarray) -> xr.DataArray:
    return xr.DataArray(values.reshape(len(values), 8, -1), dims=("group", "layer", "neuron"),
                        coords={"group": [f"g{k}" for k in range(len(values))]})


def long_rows(seed: int) -> np.ndarray:
    """Coarse values (heavy ties), some groups adversarial for a sample of every 64th value."""
    rng = np.random.default_rng(seed)
    p = rng.integers(0, 40, (5, N)) / 39.0
    p[rng.random(p.shape) < 0.3] = 0.0
    p[1] = 0.0
    p[1, ::SAMPLE_STRIDE] = 1.0           # the sample sees only the top: fewer than m reach its bound
    p[2] = 0.0
    p[2, rng.choice(N, 50, replace=False)] = 0.5  # fewer positive values than m: the threshold is 0
    p[3] = np.round(p[3] * 3) / 3         # four distinct values: huge ties at the bound
    return p


@pytest.mark.parametrize("rule", ["global_percentile", "layer_percentile", "contrastive"])
@pytest.mark.parametrize("epsilon", [0.003, 0.01, 0.05])
def test_long_rows_select_as_the_reference(rule, epsilon):
    p = long_rows(int(epsilon * 1000))
    chosen = select(frequencies(p), rule, epsilon=epsilon)
    expected = naive_rule(frequencies(p).values, rule, epsilon=epsilon)
    np.testing.assert_array_equal(chosen.selected.transpose("group", "layer", "neuron").values, expected)
    if rule == "global_percentile":
        m = max(1, math.ceil(epsilon * N - 1e-9))
        np.testing.assert_array_equal(chosen.threshold.values, np.sort(p, axis=1)[:, N - m])
        assert float(chosen.threshold.sel(group="g2")) == 0.0 and int(chosen.selected.sel(group="g2").sum()) == 50


def test_float32_sums_select_like_their_frequencies():
    """The split halves select from summed counts (float32 where exact): the same sets."""
    rng = np.random.default_rng(1)
    sums = (rng.random((3, N), dtype=np.float32) ** 3 * 900).round().astype(np.float32)
    tokens = np.array([900.0, 1234.0, 7.0 * 2**20])
    from_sums = select(frequencies(sums), "global_percentile", epsilon=0.01).selected
    from_frequencies = select(frequencies(sums / tokens[:, None]), "global_percentile", epsilon=0.01).selected
    np.testing.assert_array_equal(from_sums.values, from_frequencies.values)
    np.testing.assert_array_equal(from_sums.values, naive_rule(frequencies(sums).values, "global_percentile",
                                                               epsilon=0.01))
