"""The curation stage's settings (docs/method.md section 1).

- `DatasetSettings`: the dataset the pipeline runs on (a file or saved folder; none: the starter set).
- `CurationSettings`: how `sparcom curate` builds a balanced HexaInst dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from sparcom.core.settings import StrictModel
from sparcom.curation.sources import SourceSpec, default_sources


class DatasetSettings(StrictModel):
    path: Path | None = Field(None, description="JSONL file or saved dataset; none: the starter set")


class CurationSettings(StrictModel):
    authored: bool = Field(True, description="include the shipped AI-authored half")
    inputs: list[Path] = Field([], description="user datasets: JSONL, CSV, Parquet or saved folders")
    sources: list[SourceSpec] = Field(default_factory=default_sources, description="public sets")
    per_group: int | None = Field(100, gt=0, description="records kept per category x origin; none: all")
    seed: int = Field(0, description="seed of the balanced sampling")
    on_error: Literal["raise", "quarantine"] = Field("raise", description="bad user records")
    tokenizer: str = Field("default", description="tokenizer of the length limits: model name or path")
    max_prompt_tokens: int | None = Field(1024, gt=0, description="chat-templated prompt; none: no limit")
    max_response_tokens: int | None = Field(1024, gt=0, description="reference response; none: no limit")
    near_duplicate_threshold: float = Field(0.8, gt=0, le=1, description="word-shingle Jaccard")
    shingle_words: int = Field(3, gt=0, description="words per shingle")
    out: Path | None = Field(None, description="output folder; none: work_dir/datasets/<hash>")
