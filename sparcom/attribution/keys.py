"""The attribution stage's keys (docs/method.md section 8).

- `ATTRIBUTE`: the stage's code (`sparcom.attribution.stage` and all it imports: the estimate, the
  store writer, local and cluster), with torch and transformers.
- `attribution_key(fingerprint, data_hash, settings, extraction, dtype)`: what a store's
  estimates depend on: the model, the records, the scored tokens, the precision and the store's
  chunks; batching and device only move float rounding.
- `planned_attribution_key(model, dataset_dir, settings, extraction, cache_dir)`: the same before
  the stage runs (from the weights' fingerprint, not the loaded model), for the caching.
"""

from __future__ import annotations

import json
from pathlib import Path

from sparcom.attribution.settings import AttributionSettings
from sparcom.core.code_version import MODEL_LIBRARIES, StageCode
from sparcom.core.hashing import content_hash
from sparcom.core.models import model_fingerprint, resolve_device, resolve_dtype, resolve_model
from sparcom.curation.dataset import MANIFEST_NAME
from sparcom.extraction.settings import ExtractionSettings, ModelSettings

ATTRIBUTE = StageCode(("sparcom.attribution.stage",), MODEL_LIBRARIES)
KEY = "attribution_key"  # the store attribute naming what an attribution store holds


def attribution_key(fingerprint: str, data_hash: str, settings: AttributionSettings, extraction: ExtractionSettings,
                    dtype: object) -> str:
    return content_hash({
        "fingerprint": fingerprint, "dataset_hash": data_hash, "max_response_tokens": settings.max_response_tokens,
        "dtype": str(dtype), "shard_size": extraction.shard_size, "layer_chunk": extraction.layer_chunk,
        "code": ATTRIBUTE.version(),
    })


def planned_attribution_key(model: ModelSettings, dataset_dir: Path, settings: AttributionSettings,
                            extraction: ExtractionSettings, cache_dir: Path) -> str:
    source = resolve_model(model.name, model.revision, model.trust_remote_code)
    manifest = json.loads((Path(dataset_dir) / MANIFEST_NAME).read_text())
    loading = settings.loading(extraction)
    dtype = resolve_dtype(loading.dtype, resolve_device(loading.device))
    return attribution_key(model_fingerprint(source, cache_dir), manifest["dataset_hash"], settings, extraction, dtype)
