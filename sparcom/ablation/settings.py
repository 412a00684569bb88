"""The ablation stage's settings (docs/method.md section 6).

- `AblationSettings`: the family switched off, the controls and seeds, the evaluation records, the
  scored tokens, the optional accuracy decoding, the statistics' resamples and the fidelity check
  of the attribution estimates; `for_tuned_model()`, the settings of the comparison's second
  ablation (the tuned model's components on the tuned model).
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
    - 1 seed per control (was 3). The frequency-matched control, the one the causal verdict is
      against, is nearly fixed by the frequencies (the nearest component, ties at random), so
      more draws change it little; the random control is description only. No control is
      dropped; raise `seeds` where time allows.
    - each control measured on its own group's records (`control_records: own`): the causal test
      compares a group's set with its controls on the group's records only, so the other groups'
      records under a control (the rest of the `delta_control` matrix, description) cost 5 of
      every 6 control record passes and decide nothing. `all` measures them.
    - the fidelity probes (attribution rules) measured on the first record of each group
      (`fidelity_per_group`): a probe's estimate and its measured delta are compared on the same
      records, so fewer records make the comparison no less exact, only narrower in scope; the
      number of probes (24), which decides the interval of the rank correlation, is kept.
    - the first 16 response tokens scored (unchanged).
    - the fidelity check on the base model only (`for_tuned_model`): the tuned model's estimates
      are made by the same estimator; `fidelity: true` checks them too.
    - in `sparcom run`, one folder of finished passes for every rule and model
      (`PipelineSettings.passes_dir`): the intact pass of a model runs once for all rules.

    Record passes per rule and model, 6 groups of 8: intact 48 + sets 6 x 48 + controls 6 x 2 x 8
    = 432 (was 912 with every control on every record, 2,064 with 3 seeds); an attribution rule
    adds 24 probes x 6 records + the 6 records intact = 150 (was 24 x 48 = 1,152). Two rules x
    two models: 4 x 432 + 150 - 2 x 48 (the intact passes shared) = 1,782 record passes, about 8
    minutes at the 3.7 records/s the held-out records run at on 2 cores (the same work with
    every record, fidelity on both models, was 5,952). On a GPU raise
    `eval_per_group`, `seeds` and `fidelity_per_group`, measure `control_records: all` and drop
    `max_response_tokens`."""

    enabled: bool = Field(True, description="the pipeline ablates each group's components after identifying them")
    family: Literal[FAMILY_CHOICES] = Field(
        "auto", description="components switched off; auto: neurons where the model has dense layers, else experts")
    controls: list[Literal[CONTROLS]] = Field(list(CONTROLS), description="control sets of the same size per layer")
    seeds: int = Field(1, gt=0, description="draws of each control")
    control_records: Literal["own", "all"] = Field(
        "own", description="the records each control is measured on: its group's own (all the causal test "
                           "compares) or every evaluation record (the whole delta_control matrix)")
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
                          "none: when the components' rule is an attribution rule, on the base model (the "
                          "comparison's tuned model only with true)")
    fidelity_probes: int = Field(24, gt=0, description="fidelity: single components switched off one at a time, "
                                                       "half the strongest positive estimates, half negative")
    fidelity_per_group: int | None = Field(
        1, gt=0, description="fidelity: the first evaluation records of each group the probes are measured and "
                             "estimated on; none: all")

    def for_tuned_model(self) -> AblationSettings:
        """The comparison's ablation of the tuned model: the same, but the fidelity check only
        where asked for (`fidelity: true`); by default the base model's check of the estimator stands."""
        return self if self.fidelity is not None else self.model_copy(update={"fidelity": False})
