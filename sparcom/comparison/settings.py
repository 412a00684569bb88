"""The fine-tune and comparison settings (docs/method.md section 5).

- `FinetuneSettings`: the training data, method, length and optimiser of `sparcom finetune`.
- `ComparisonSettings`: whether the pipeline compares with a tuned model, and which.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from sparcom.core.settings import StrictModel
from sparcom.curation.records import Category
from sparcom.extraction.settings import DType, ModelSettings


class FinetuneSettings(StrictModel):
    """Defaults finish on 2 CPU cores in a few minutes on the default model; `epochs` and a
    larger `max_tokens` give real training lengths on a GPU."""

    categories: list[Category] = Field(
        ["CODE", "MATH"], description="categories trained on (HexaInst or the user dataset); []: all")
    dataset: Path | None = Field(None, description="JSONL or saved dataset; none: shipped HexaInst")
    method: Literal["full", "lora"] = "full"
    steps: int = Field(60, gt=0, description="optimizer steps, unless `epochs` is set")
    epochs: float | None = Field(None, gt=0, description="passes over the data (overrides steps)")
    batch_size: int = Field(4, gt=0)
    gradient_accumulation: int = Field(1, gt=0)
    max_tokens: int = Field(128, gt=1, description="prompt + response tokens per example, cut at the end")
    learning_rate: float | None = Field(None, gt=0, description="none: 1e-4 for full, 5e-4 for LoRA")
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    lora_rank: int = Field(16, gt=0)
    lora_alpha: float = Field(32.0, gt=0)
    gradient_checkpointing: bool = False
    seed: int = 0
    dtype: DType = Field("auto", description="auto: float32 on CPU, bfloat16 on GPU")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, mps")


class ComparisonSettings(StrictModel):
    enabled: bool = Field(True, description="the pipeline compares the model with a tuned one")
    tuned: ModelSettings | None = Field(None, description="the tuned model; none: fine-tune the model")
    top_movers: int = Field(10, gt=0, description="components listed per group as moving most")
