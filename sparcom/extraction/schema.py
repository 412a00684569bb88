"""The count store's names (docs/method.md section 7): what other stages read from a store.

- Dimension names: `INSTRUCTION`, `LAYER`, `NEURON`, `MOE_LAYER`, `EXPERT`, `EXPERT_NEURON`,
  `SHARED_NEURON`.
- `TOKEN_COUNT`: the variable of counted tokens per instruction.
- `CountFamily`, `COUNT_FAMILIES`: each component family (dense neurons, routed experts, neurons of
  routed experts, neurons of shared experts), the variable counting it and its dimensions;
  `FAMILY_NAMES` their names, as configuration and reports spell them.

The names are the store contract: changing one changes what every store holds, so this module is
part of the extraction stage's code version (and of every stage that reads stores).
"""

from __future__ import annotations

from dataclasses import dataclass

INSTRUCTION = "instruction"
LAYER = "layer"
NEURON = "neuron"
MOE_LAYER = "moe_layer"
EXPERT = "expert"
EXPERT_NEURON = "expert_neuron"
SHARED_NEURON = "shared_neuron"
TOKEN_COUNT = "token_count"


@dataclass(frozen=True)
class CountFamily:
    name: str                   # as configuration, reports and file names spell it
    count: str                  # the store variable
    dims: tuple[str, ...]       # its dims after `instruction`, the layer first

    @property
    def layer_dim(self) -> str:
        return self.dims[0]


COUNT_FAMILIES = (
    CountFamily("neurons", "act_count", (LAYER, NEURON)),
    CountFamily("experts", "expert_count", (MOE_LAYER, EXPERT)),
    CountFamily("expert_neurons", "expert_act_count", (MOE_LAYER, EXPERT, EXPERT_NEURON)),
    CountFamily("shared_neurons", "shared_act_count", (MOE_LAYER, SHARED_NEURON)),
)
FAMILY_NAMES = tuple(family.name for family in COUNT_FAMILIES)
