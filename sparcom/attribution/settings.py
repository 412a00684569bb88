"""The attribution stage's settings (docs/method.md section 6a).

- `AttributionSettings`: the scored response tokens and the precision of the pass.
"""

from __future__ import annotations

from pydantic import Field

from sparcom.core.settings import StrictModel
from sparcom.extraction.settings import DType


class AttributionSettings(StrictModel):
    """Batching, device and the store's chunks are the extraction's (`ExtractionSettings`)."""

    max_response_tokens: int | None = Field(
        16, gt=0, description="response tokens scored per record (the first ones), as the ablation scores; none: all")
    dtype: DType | None = Field(
        None, description="precision of the forward and backward pass; none: the extraction's "
                          "(auto: float32 on CPU, bfloat16 on GPU); the store holds float32 either way")
