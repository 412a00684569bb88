"""The extraction stage's keys (docs/method.md section 8).

- `EXTRACT`: the stage's code (`sparcom.extraction.stage` and all it imports: local and cluster
  counting, the store writer, the prompt format, the architecture table), with torch and
  transformers.
- `extraction_key(fingerprint, data_hash, settings, dtype)`: what a store's counts depend on;
  batching and device only move float rounding (docs/method.md section 7).
- `counts_key(fingerprint, span, dtype)`: what one instruction's counts depend on: rows of
  stores with equal keys are interchangeable.
- `planned_extraction_key(model, dataset_dir, settings, cache_dir)`: the extraction key before
  the stage runs (from the weights' fingerprint, not the loaded model), for the caching.
"""

from __future__ import annotations

import json
from pathlib import Path

from sparcom.core.code_version import MODEL_LIBRARIES, StageCode
from sparcom.core.hashing import content_hash
from sparcom.core.models import model_fingerprint, resolve_device, resolve_dtype, resolve_model
from sparcom.curation.dataset import MANIFEST_NAME
from sparcom.extraction.settings import ExtractionSettings, ModelSettings

EXTRACT = StageCode(("sparcom.extraction.stage",), MODEL_LIBRARIES)


def extraction_key(fingerprint: str, data_hash: str, settings: ExtractionSettings, dtype: object) -> str:
    return content_hash({
        "fingerprint": fingerprint, "dataset_hash": data_hash, "span": settings.span,
        "dtype": str(dtype), "shard_size": settings.shard_size, "layer_chunk": settings.layer_chunk,
        "code": EXTRACT.version(),
    })


def counts_key(fingerprint: str, span: str, dtype: object) -> str:
    return content_hash({"fingerprint": fingerprint, "span": span, "dtype": str(dtype), "code": EXTRACT.version()})


def planned_extraction_key(model: ModelSettings, dataset_dir: Path, settings: ExtractionSettings,
                           cache_dir: Path) -> str:
    source = resolve_model(model.name, model.revision, model.trust_remote_code)
    manifest = json.loads((Path(dataset_dir) / MANIFEST_NAME).read_text())
    dtype = resolve_dtype(settings.dtype, resolve_device(settings.device))
    return extraction_key(model_fingerprint(source, cache_dir), manifest["dataset_hash"], settings, dtype)
