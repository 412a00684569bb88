"""The identification stage's settings (docs/method.md sections 2, 4a and 4b).

- `IdentificationSettings`: the selection rule and its parameters, the grouping, the split-half seeds,
  and the attribution store the attribution rules select from.
- `SelectionRule`: the rule names of `sparcom.identification.schema.RULES`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from sparcom.core.settings import StrictModel
from sparcom.identification.schema import GROUP_BY, RULES

SelectionRule = Literal[RULES]


class IdentificationSettings(StrictModel):
    rule: SelectionRule = "global_percentile"
    epsilon: float = Field(0.01, gt=0, le=1, description="fraction kept by the percentile rules")
    tau: float = Field(0.5, gt=0, le=1, description="frequency threshold of the 'threshold' rule")
    # lape's three rates, defaults as in the released identify.py of Tang et al. 2024 (docs/method.md section 4a)
    top_rate: float = Field(0.01, gt=0, lt=1, description="lape: fraction of components kept by entropy")
    filter_rate: float = Field(0.95, gt=0, lt=1, description="lape: quantile a candidate's frequency exceeds")
    bar_ratio: float = Field(0.95, gt=0, lt=1, description="lape: quantile a member's frequency exceeds")
    group_by: Literal[GROUP_BY] = "category"
    split_half_seeds: int = Field(5, ge=0, description="split-half reliability: seeds (0: off)")
    attribution: Path | None = Field(
        None, description="the attribution rules: ATTR.zarr of the count store's records (sparcom attribute); "
                          "the other rules do not read it")
