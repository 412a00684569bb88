"""The identification stage's settings (docs/method.md sections 2, 4a and 4b).

- `IdentificationSettings`: the selection rule (or several side by side, `rules`) and their
  parameters, the grouping, the split-half seeds and permutations of its null, and the
  attribution store the attribution rules select from; `selected_rules()` the rules a run
  selects with, `for_rule(rule)` the one-rule settings of one of them (what its run folder and
  cache key are computed from).
- `SelectionRule`: the rule names of `sparcom.identification.schema.RULES`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from sparcom.core.settings import StrictModel
from sparcom.identification.schema import GROUP_BY, RULES

SelectionRule = Literal[RULES]


class IdentificationSettings(StrictModel):
    rule: SelectionRule = "global_percentile"
    rules: list[SelectionRule] | None = Field(
        None, description="several rules side by side, selected in one pass (none: `rule` alone)")
    epsilon: float = Field(0.01, gt=0, le=1, description="fraction kept by the percentile rules")
    tau: float = Field(0.5, gt=0, le=1, description="frequency threshold of the 'threshold' rule")
    # lape's three rates, defaults as in the released identify.py of Tang et al. 2024 (docs/method.md section 4a)
    top_rate: float = Field(0.01, gt=0, lt=1, description="lape: fraction of components kept by entropy")
    filter_rate: float = Field(0.95, gt=0, lt=1, description="lape: quantile a candidate's frequency exceeds")
    bar_ratio: float = Field(0.95, gt=0, lt=1, description="lape: quantile a member's frequency exceeds")
    group_by: Literal[GROUP_BY] = "category"
    split_half_seeds: int = Field(5, ge=0, description="split-half reliability: seeds (0: off)")
    split_half_permutations: int = Field(
        200, ge=0, description="split-half null: label permutations (0: off)")
    attribution: Path | None = Field(
        None, description="the attribution rules: ATTR.zarr of the count store's records (sparcom attribute); "
                          "the other rules do not read it")

    @model_validator(mode="before")
    @classmethod
    def _rule_from_rules(cls, data):
        """`rules` alone: `rule` is its first (so that the settings read back as they were written)."""
        if isinstance(data, dict) and data.get("rules") and "rule" not in data:
            return {**data, "rule": data["rules"][0]}
        return data

    @model_validator(mode="after")
    def _rules_agree(self) -> IdentificationSettings:
        if self.rules is None:
            return self
        if not self.rules:
            raise ValueError("rules: give at least one rule (or none at all, for `rule` alone)")
        repeated = sorted({r for r in self.rules if self.rules.count(r) > 1})
        if repeated:
            raise ValueError(f"rules: {', '.join(repeated)} given more than once")
        if self.rule not in self.rules:
            raise ValueError(f"rule {self.rule!r} is not among rules {self.rules}: give `rule` or `rules`, not both")
        return self

    def selected_rules(self) -> list[str]:
        """The rules a run selects with, in the order given."""
        return list(self.rules) if self.rules else [self.rule]

    def for_rule(self, rule: str) -> IdentificationSettings:
        """The one-rule settings of `rule`: equal whether the rule runs alone or beside others."""
        if rule not in self.selected_rules():
            raise ValueError(f"rule {rule!r} is not among the rules of these settings {self.selected_rules()}")
        return self.model_copy(update={"rule": rule, "rules": None})
