"""What every stage's settings share: strict models, the cluster, the cache folder, error wording.

- `StrictModel`: a pydantic model that refuses unknown keys (a misspelt setting is an error).
- `DaskSettings`: the Dask cluster extraction and identification run on.
- `default_cache_dir()`: where converted models and fingerprints are kept between runs.
- `validation_message(error)`: a pydantic ValidationError as one line naming each field.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError


def default_cache_dir() -> Path:
    """XDG convention."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparcom"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DaskSettings(StrictModel):
    address: str | None = Field(None, description="an existing Dask scheduler; none: a local cluster")
    n_workers: int | None = Field(None, gt=0, description="local cluster workers; none: one per core")
    threads_per_worker: int = Field(1, gt=0, description="threads of each local worker")
    memory_limit: str = Field("auto", description="per local worker, e.g. '2GB'; auto: RAM / workers")
    connect_timeout: str = Field("30s", description="how long to try reaching `address`")
    shard_resources: dict[str, float] | None = Field(
        None, description="Dask resources each extraction shard needs on a worker, e.g. {GPU: 1}; "
                          "none: {GPU: 1} when the extraction device is cuda, else none")


def validation_message(error: ValidationError) -> str:
    """Pydantic's errors as one line: 'extraction.shard_size: Input should be ... (got 0)'."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']} (got {e.get('input')!r})"
                     for e in error.errors())
