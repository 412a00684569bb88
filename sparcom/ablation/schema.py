"""The ablation's names (docs/method.md section 6): controls, dimensions, output files.

- `CONTROLS`: the control sets, each the same size per layer as the ablated set.
- `CAUSAL_CONTROL`: the control the causal verdict is against (docs/method.md section 6b).
- `FAMILY_CHOICES`: the families that can be switched off, and `auto`.
- Dimension names of `ablation.zarr`: `INSTRUCTION`, `ABLATED`, `EVALUATED`, `CONTROL`, `SEED`
  (a control's draw), `RESAMPLE`, `BOUND`, `PROBE` (a single component of the fidelity check,
  `sparcom.ablation.fidelity`).
- Output files: `ABLATION` (the data), `ABLATION_REPORT`, `ABLATION_SUMMARY`, `ABLATION_PLOT`;
  `PASSES`, the folder of finished passes (`sparcom.ablation.passes`) a rerun reuses.
"""

from __future__ import annotations

from sparcom.extraction.schema import FAMILY_NAMES, INSTRUCTION  # noqa: F401 - the ablation's dimension too

CONTROLS = ("random", "frequency_matched")
# It separates "often-active components matter" from "this category's components matter".
CAUSAL_CONTROL = "frequency_matched"
FAMILY_CHOICES = ("auto", *FAMILY_NAMES)

ABLATED, EVALUATED, CONTROL, SEED = "ablated", "evaluated", "control", "seed"
RESAMPLE, BOUND = "resample", "bound"
PROBE = "probe"

ABLATION = "ablation.zarr"
ABLATION_REPORT = "ablation.md"
ABLATION_SUMMARY = "ablation.json"
ABLATION_PLOT = "ablation.png"
PASSES = "passes"
