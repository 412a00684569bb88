"""The attribution stage as the pipeline runs it (docs/method.md section 6a).

- `attribute_dataset(model, dataset_dir, settings, extraction, stores_dir, cache_dir, dask=...)`:
  the store is named by its attribution key, and a finished one is reused without loading the
  model. With `dask` settings the shards run on the cluster `sparcom.core.cluster.extraction_cluster`
  chooses (`sparcom.attribution.store.attribute_on_cluster`), or in this process where it
  chooses none; the steps it shares with extraction are `sparcom.extraction.model_stage`'s.
"""

from __future__ import annotations

from pathlib import Path

from sparcom.attribution.keys import attribution_key
from sparcom.attribution.settings import AttributionSettings
from sparcom.attribution.store import attribute_on_cluster, attribute_to_store, check_attribution
from sparcom.core.settings import DaskSettings
from sparcom.extraction.extract import ProgressCallback
from sparcom.extraction.model_stage import run_model_stage
from sparcom.extraction.settings import ExtractionSettings, ModelSettings


def attribute_dataset(
    model: ModelSettings,
    dataset_dir: Path,
    settings: AttributionSettings,
    extraction: ExtractionSettings,
    stores_dir: Path,
    cache_dir: Path,
    on_progress: ProgressCallback | None = None,
    dask: DaskSettings | None = None,
) -> Path:
    return run_model_stage(
        model, dataset_dir, settings.loading(extraction), stores_dir, cache_dir, dask,
        check=lambda records: check_attribution(records, dataset_dir),
        key=lambda fingerprint, data_hash, dtype: attribution_key(fingerprint, data_hash, settings, extraction, dtype),
        on_cluster=lambda client, resources, records, store: attribute_on_cluster(
            client, model, records, store, settings, extraction, resources, cache_dir, on_progress),
        locally=lambda loaded, records, store: attribute_to_store(
            loaded, records, store, settings, extraction, on_progress=on_progress))
