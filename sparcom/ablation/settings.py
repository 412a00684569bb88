"""The ablation stage's settings (docs/method.md section 6).

- `AblationSettings`: the family switched off, the controls and seeds, the evaluation records, the
  scored tokens, the optional accuracy decoding, the statistics' resamples and the fidelity check
  of the attribution estimates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from sparcom.ablation.schema import CONTROLS, FAMILY_CHOICES
from sparcom.core.settings import StrictModel


class AblationSettings(StrictModel):
    """The causal check (docs/method.md section 6). The defaults are sized for the default run on 2
    CPU cores: 3 held-out records per category, the first 16 response tokens, 3 seeds per control,
    i.e. 1 + 6 x (1 + 2 x 3) = 43 passes over 18 records, for the model and again for its fine-tune.
    On a GPU raise `eval_per_group` and drop `max_response_tokens`."""

    enabled: bool = Field(True, description="the pipeline ablates each group's components after identifying them")
    family: Literal[FAMILY_CHOICES] = Field(
        "auto", description="components switched off; auto: neurons where the model has dense layers, else experts")
    controls: list[Literal[CONTROLS]] = Field(list(CONTROLS), description="control sets of the same size per layer")
    seeds: int = Field(3, gt=0, description="draws of each control")
    seed: int = Field(0, description="seed of the controls, the bootstrap and the permutations")
    eval_dataset: Path | None = Field(
        None, description="records that judge the components; none: shipped HexaInst records of the "
                          "same categories that identification did not use")
    held_out_fraction: float | None = Field(
        None, gt=0, lt=1, description="the pipeline identifies on the rest of the dataset and evaluates on this "
                                      "fraction of each category (by record hash); none: see eval_dataset")
    eval_per_group: int | None = Field(3, gt=0, description="evaluation records per group; none: all")
    max_response_tokens: int | None = Field(
        16, gt=0, description="response tokens scored per record (the first ones); none: all")
    allow_overlap: bool = Field(False, description="evaluate on records that also selected the components")
    accuracy: bool = Field(
        False, description="also greedy-decode the records with a checkable answer (CLS label, MATH final "
                           "number) intact and under every ablation, and score their accuracy; off by default: slow on CPU")
    max_new_tokens: int = Field(128, gt=0, description="accuracy: tokens greedy-decoded per record at most")
    resamples: int = Field(1000, gt=0, description="bootstrap resamples over records")
    permutations: int = Field(10000, gt=0, description="sign flips of the permutation test")
    fidelity: bool | None = Field(
        None, description="also measure how well the attribution estimates predict the switch-offs (the sets' "
                          "summed estimates beside delta, single components switched off one at a time); "
                          "none: when the components' rule is an attribution rule")
    fidelity_probes: int = Field(24, gt=0, description="fidelity: single components switched off one at a time, "
                                                       "half the strongest positive estimates, half negative")
