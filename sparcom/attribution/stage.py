"""The attribution stage as the pipeline runs it (docs/method.md section 6a).

- `attribute_dataset(model, dataset_dir, settings, extraction, stores_dir, cache_dir, dask=...)`:
  the store is named by its attribution key, and a finished one is reused without loading the
  model. With `dask` settings the shards run on the cluster `sparcom.core.cluster.extraction_cluster`
  chooses (`sparcom.attribution.store.attribute_on_cluster`), or in this process where it
  chooses none.
"""

from __future__ import annotations

from pathlib import Path

from sparcom.attribution.keys import attribution_key
from sparcom.attribution.settings import AttributionSettings
from sparcom.attribution.store import attribute_on_cluster, attribute_to_store, check_attribution
from sparcom.core.cluster import extraction_cluster
from sparcom.core.models import (
    check_device_map,
    load_model,
    model_fingerprint,
    model_slug,
    resolve_device,
    resolve_dtype,
    resolve_model,
)
from sparcom.core.settings import DaskSettings
from sparcom.curation.dataset import load_records
from sparcom.curation.records import dataset_hash
from sparcom.extraction.distributed import shard_resources
from sparcom.extraction.extract import ProgressCallback
from sparcom.extraction.settings import ExtractionSettings, ModelSettings
from sparcom.extraction.store import is_complete, repair_store


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
    if dask is None or not dask.address:  # a remote cluster's workers check their own devices
        check_device_map(model.device_map, model.max_memory)
    records = load_records(dataset_dir)
    check_attribution(records, dataset_dir)
    loading = settings.loading(extraction)
    source = resolve_model(model.name, model.revision, model.trust_remote_code)
    dtype = resolve_dtype(loading.dtype, resolve_device(loading.device))
    key = attribution_key(model_fingerprint(source, cache_dir), dataset_hash(records), settings, extraction, dtype)
    store = Path(stores_dir) / f"{model_slug(model.name)}-{key[:16]}.zarr"
    if is_complete(store) and not repair_store(store):
        return store
    if dask is not None:
        with extraction_cluster(dask, loading.device, spread=model.device_map is not None) as client:
            if client is not None:
                return attribute_on_cluster(client, model, records, store, settings, extraction,
                                            shard_resources(dask, loading), cache_dir, on_progress)
    loaded = load_model(source, cache_dir, loading.dtype, loading.device, model.trust_remote_code,
                        model.device_map, model.max_memory)
    return attribute_to_store(loaded, records, store, settings, extraction, on_progress=on_progress)
