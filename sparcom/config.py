"""Typed settings for every stage, with defaults that a YAML file or command-line flags override.

- `PipelineSettings`: the whole pipeline (model, dataset, extraction, identification, folders).
- `load_settings(yaml_path, overrides)`: defaults, then the YAML file, then dotted overrides
  such as {"identification.epsilon": 0.02}.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

TokenSpan = Literal["prompt", "content", "response"]
DType = Literal["auto", "float32", "float64", "bfloat16", "float16"]
SelectionRule = Literal["global_percentile", "threshold", "layer_percentile"]


def default_cache_dir() -> Path:
    """Where converted models and fingerprints are kept between runs (XDG convention)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparcom"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(StrictModel):
    name: str = Field("default", description="'default', a hub id, a local directory or a .gguf file")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    trust_remote_code: bool = Field(False, description="run the model repository's own code")


class DatasetSettings(StrictModel):
    path: Path | None = Field(None, description="JSONL file or saved dataset; none: the starter set")


class ExtractionSettings(StrictModel):
    span: TokenSpan = "prompt"
    dtype: DType = Field("auto", description="auto: float32 on CPU, bfloat16 on GPU")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, mps")
    batch_tokens: int = Field(8192, gt=0, description="padded tokens per forward pass")
    max_batch_size: int = Field(64, gt=0)
    padding_side: Literal["right", "left"] = "right"
    shard_size: int = Field(32, gt=0, description="instructions per shard and per store chunk")
    layer_chunk: int = Field(8, gt=0, description="layers per store chunk")


class IdentificationSettings(StrictModel):
    rule: SelectionRule = "global_percentile"
    epsilon: float = Field(0.01, gt=0, le=1, description="fraction kept by the percentile rules")
    tau: float = Field(0.5, gt=0, le=1, description="frequency threshold of the 'threshold' rule")
    group_by: Literal["category", "origin", "instruction"] = "category"


class PipelineSettings(StrictModel):
    model: ModelSettings = ModelSettings()
    dataset: DatasetSettings = DatasetSettings()
    extraction: ExtractionSettings = ExtractionSettings()
    identification: IdentificationSettings = IdentificationSettings()
    work_dir: Path = Field(Path("sparcom-work"), description="datasets, stores and run reports")
    cache_dir: Path = Field(default_factory=default_cache_dir, description="converted models")


def load_settings(yaml_path: Path | None = None, overrides: dict[str, Any] | None = None) -> PipelineSettings:
    data: dict[str, Any] = {}
    if yaml_path is not None:
        loaded = yaml.safe_load(Path(yaml_path).read_text(encoding="utf-8"))
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{yaml_path}: expected a mapping of settings at the top level")
        data = loaded or {}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return PipelineSettings.model_validate(data)
