"""The extraction stage's settings (docs/method.md sections 2, 3 and 7).

- `ModelSettings`: which model, at which revision, spread over which devices.
- `ExtractionSettings`: the counted tokens, the precision, the device, batching and the store's chunks.
- `TokenSpan`, `DType`: the choices of span and precision, shared by the stages that run the model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sparcom.core.settings import StrictModel

TokenSpan = Literal["prompt", "content", "response"]
DType = Literal["auto", "float32", "float64", "bfloat16", "float16"]


class ModelSettings(StrictModel):
    name: str = Field("default", description="'default', a hub id, a local directory or a .gguf file")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    trust_remote_code: bool = Field(False, description="run the model repository's own code")
    device_map: str | dict[str, int | str] | None = Field(
        None, description="spread a model too large for one device (accelerate): 'auto', 'balanced', "
                          "'sequential' or {module: device}; none: the whole model on extraction.device")
    max_memory: dict[int | str, str] | None = Field(
        None, description="with device_map: memory per device, e.g. {0: 20GiB, 1: 20GiB, cpu: 64GiB}")


class ExtractionSettings(StrictModel):
    span: TokenSpan = "prompt"
    dtype: DType = Field("auto", description="auto: float32 on CPU, bfloat16 on GPU")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, mps")
    batch_tokens: int = Field(8192, gt=0, description="padded tokens per forward pass")
    max_batch_size: int = Field(64, gt=0)
    max_padding: float = Field(0.05, ge=0, lt=1, description="padded-token fraction allowed per batch")
    padding_side: Literal["right", "left"] = "right"
    shard_size: int = Field(32, gt=0, description="instructions per shard and per store chunk")
    layer_chunk: int = Field(8, gt=0, description="layers per store chunk")
