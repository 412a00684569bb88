"""The attribution store's names (docs/method.md section 6a): what the selection rules read.

- `AttributionFamily`, `ATTRIBUTION_FAMILIES`: each component family (`sparcom.extraction.schema`)
  with the variable holding its estimates; the dims are the count store's.
- `RESPONSE_TOKENS`: the variable of scored response tokens per instruction.
- `MAX_RESPONSE_TOKENS`, `NLL_DEFINITION`: store attributes; `NLL_WORDS`, the definition's text.
- `ATTRIBUTION_RULES`: the selection rules that read an attribution store; the pipeline runs the
  attribution stage when one of them is chosen.
- `STORE_KIND`: the output marker of attribution stores.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparcom.extraction.schema import COUNT_FAMILIES, CountFamily

RESPONSE_TOKENS = "response_tokens"
MAX_RESPONSE_TOKENS = "max_response_tokens"
NLL_DEFINITION = "nll_definition"
NLL_WORDS = ("mean negative log-likelihood (natural log) of the reference response's first "
             "max_response_tokens tokens, teacher-forced after the chat-templated prompt; no EOS appended")
ATTRIBUTION_RULES = ("attribution", "attribution_contrastive")
STORE_KIND = "attribution store"


@dataclass(frozen=True)
class AttributionFamily(CountFamily):
    """A count family with the variable of its estimates."""
    attribution: str


_VARIABLES = {"neurons": "act_attribution", "experts": "expert_attribution",
              "expert_neurons": "expert_act_attribution", "shared_neurons": "shared_act_attribution"}
ATTRIBUTION_FAMILIES = tuple(AttributionFamily(f.name, f.count, f.dims, _VARIABLES[f.name]) for f in COUNT_FAMILIES)
