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
    """The causal check (docs/method.md section 6). The defaults are sized so that the tests can say
    yes on the default run, within its time on 2 CPU cores:

    - 8 held-out records per group: a sign-flip test over n records cannot go below p = 2^-n, so
      3 records (the old default) could never give p < 1/8; 8 records reach 2^-8 = 0.0039, and
      after Holm over 6 groups 6 x 2^-8 = 0.023 < 0.05 (the two-sample test of own against the
      others' 40 records reaches 1 / C(48, 8), far below). With `held_out_fraction`, choose it
      so that every category keeps at least 8 held-out records; with fewer the findings say
      "undecided: too few records" and the smallest p the test could reach.
    - 1 seed per control (was 3): passes = 1 + groups x (1 + controls x seeds) = 1 + 6 x 3 = 19
      over 48 records, 912 record passes per rule and model (was 43 x 18 = 774; 3 seeds at 8
      records would be 43 x 48 = 2,064). The frequency-matched control, the one the causal
      verdict is against, is nearly fixed by the frequencies (the nearest component, ties at
      random), so more draws change it little; the random control is description only. No
      control is dropped; raise `seeds` where time allows.
    - the first 16 response tokens scored (unchanged).

    Two rules x two models (base and fine-tune) at about 6 records/s on 2 cores: 4 x 912 / 6 = about
    10 minutes of ablation (the old defaults' 8 records x 3 seeds would be about 23). On a GPU
    raise `eval_per_group`, `seeds` and drop `max_response_tokens`."""

    enabled: bool = Field(True, description="the pipeline ablates each group's components after identifying them")
    family: Literal[FAMILY_CHOICES] = Field(
        "auto", description="components switched off; auto: neurons where the model has dense layers, else experts")
    controls: list[Literal[CONTROLS]] = Field(list(CONTROLS), description="control sets of the same size per layer")
    seeds: int = Field(1, gt=0, description="draws of each control")
    seed: int = Field(0, description="seed of the controls, the bootstrap and the permutations")
    eval_dataset: Path | None = Field(
        None, description="records that judge the components; none: shipped HexaInst records of the "
                          "same categories that identification did not use")
    held_out_fraction: float | None = Field(
        None, gt=0, lt=1, description="the pipeline identifies on the rest of the dataset and evaluates on this "
                                      "fraction of each category (by record hash); none: see eval_dataset")
    eval_per_group: int | None = Field(8, gt=0, description="evaluation records per group; none: all")
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
