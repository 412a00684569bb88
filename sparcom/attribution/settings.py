"""The attribution stage's settings (docs/method.md section 6a).

- `AttributionSettings`: the scored response tokens and the precision of the pass;
  `loading(extraction)`, the extraction settings the stage loads the model and batches with.
"""

from __future__ import annotations

from pydantic import Field

from sparcom.core.settings import StrictModel
from sparcom.extraction.settings import DType, ExtractionSettings


class AttributionSettings(StrictModel):
    """Batching, device and the store's chunks are the extraction's (`ExtractionSettings`)."""

    max_response_tokens: int | None = Field(
        16, gt=0, description="response tokens scored per record (the first ones), as the ablation scores; none: all")
    dtype: DType | None = Field(
        None, description="precision of the forward and backward pass; none: the extraction's "
                          "(auto: float32 on CPU, bfloat16 on GPU); the store holds float32 either way")

    def loading(self, extraction: ExtractionSettings) -> ExtractionSettings:
        """The extraction's settings with this stage's precision: how the stage loads and batches."""
        return extraction if self.dtype is None else extraction.model_copy(update={"dtype": self.dtype})
