"""Identification's names: rules, families' output variables, output files (docs/method.md sections 2-4, 8).

- `RULES`, `COMPARING_RULES` (they need two groups or more), `RANK_RULES` (they rank within each
  group, so select the same sets from summed counts as from frequencies), `ATTRIBUTION_RULES`
  (they select by the attribution store's estimates, not by frequency; named in
  `sparcom.attribution.schema`, whose stage the pipeline runs for them).
- `GROUP`, `GROUP_BY`: the group dimension of every result, and the groupings offered.
- `REPEAT_DIMS`: dims along which a selection is repeated independently (`HALF`, `SPLIT_SEED`,
  `PERMUTATION`: split-half reliability and its null), never component dims.
- `Family`, `FAMILIES`, `families_in(dataset, by)`: each count family of the store with the
  names of its outputs (frequency, selected set, threshold), of its estimates in the attribution
  store (`attribution`, e.g. `act_attribution`) and of their group means (`attribution_mean`).
- `RECORD_TOTAL`: records per group, the attribution means' denominator.
- Output files of a run folder: `COMPONENTS`, `GENERALITY`, `SUMMARY`, `REPORT`, `TABLES`, and
  `RUN_KIND`, the output marker of run folders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sparcom.attribution.schema import ATTRIBUTION_FAMILIES, ATTRIBUTION_RULES
from sparcom.extraction.schema import COUNT_FAMILIES, INSTRUCTION, CountFamily

if TYPE_CHECKING:  # the names alone, without xarray: the command line reads them at start
    import xarray as xr

RULES = ("global_percentile", "layer_percentile", "threshold", "lape", "contrastive", "attribution",
         "attribution_contrastive")
COMPARING_RULES = ("lape", "contrastive", "attribution_contrastive")
# Exact for integer sums below 2**52: distinct sums stay distinct, in order, after the division.
RANK_RULES = ("global_percentile", "layer_percentile")

GROUP = "group"
GROUP_BY = ("category", "origin", "instruction")
HALF = "half"
SPLIT_SEED = "split_seed"
PERMUTATION = "permutation"
REPEAT_DIMS = (HALF, SPLIT_SEED, PERMUTATION)

COMPONENTS = "components.zarr"
GENERALITY = "generality.zarr"
SUMMARY = "summary.json"
REPORT = "report.md"
TABLES = "tables"
RUN_KIND = "run"
RECORD_TOTAL = "record_total"


@dataclass(frozen=True)
class Family(CountFamily):
    """A count family with the names of its identification outputs."""
    frequency: str
    selected: str
    threshold: str
    attribution: str
    attribution_mean: str

    def component_dims(self, store: xr.Dataset) -> list[str]:
        return [d for d in store[self.count].dims if d != INSTRUCTION]

    def ranked_by(self, rule: str) -> str:
        """The variable the rule selects from: the estimates' group means or the frequencies."""
        return self.attribution_mean if rule in ATTRIBUTION_RULES else self.frequency


_OUTPUTS = {
    "neurons": ("frequency", "isn", "threshold", "attribution_mean"),
    "experts": ("expert_frequency", "ise", "expert_threshold", "expert_attribution_mean"),
    "expert_neurons": ("expert_neuron_frequency", "expert_isn", "expert_neuron_threshold",
                       "expert_neuron_attribution_mean"),
    "shared_neurons": ("shared_frequency", "shared_isn", "shared_threshold", "shared_attribution_mean"),
}
_ESTIMATES = {f.name: f.attribution for f in ATTRIBUTION_FAMILIES}
FAMILIES = tuple(Family(f.name, f.count, f.dims, *_OUTPUTS[f.name][:3], attribution=_ESTIMATES[f.name],
                        attribution_mean=_OUTPUTS[f.name][3]) for f in COUNT_FAMILIES)


def families_in(dataset: xr.Dataset, by: str = "count") -> list[Family]:
    """The families whose variable `by` (count, frequency, selected, attribution...) the dataset holds."""
    return [f for f in FAMILIES if getattr(f, by) in dataset]
