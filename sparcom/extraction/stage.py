"""The extraction stage as the pipeline runs it (docs/method.md sections 2, 3 and 7).

- `extract_dataset(model, dataset_dir, settings, stores_dir, cache_dir, dask=...)`: the store is
  named by its extraction key, and a finished one is reused without loading the model. Records
  counted before for the same model, span and dtype (in any finished store beside it) are
  copied, so adding ten instructions counts only those ten. With `dask` settings the shards run
  on the cluster `sparcom.core.cluster.extraction_cluster` chooses (`sparcom.extraction.distributed`),
  or in this process (`sparcom.extraction.extract`) where it chooses none.
"""

from __future__ import annotations

from pathlib import Path

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
from sparcom.extraction.distributed import extract_on_cluster, shard_resources
from sparcom.extraction.extract import ProgressCallback, check_extraction, extract_to_store
from sparcom.extraction.keys import extraction_key
from sparcom.extraction.settings import ExtractionSettings, ModelSettings
from sparcom.extraction.store import is_complete, repair_store


def extract_dataset(
    model: ModelSettings,
    dataset_dir: Path,
    settings: ExtractionSettings,
    stores_dir: Path,
    cache_dir: Path,
    on_progress: ProgressCallback | None = None,
    dask: DaskSettings | None = None,
) -> Path:
    if dask is None or not dask.address:  # a remote cluster's workers check their own devices
        check_device_map(model.device_map, model.max_memory)
    records = load_records(dataset_dir)
    check_extraction(records, settings, None, dataset_dir)
    source = resolve_model(model.name, model.revision, model.trust_remote_code)
    dtype = resolve_dtype(settings.dtype, resolve_device(settings.device))
    key = extraction_key(model_fingerprint(source, cache_dir), dataset_hash(records), settings, dtype)
    slug = model_slug(model.name)
    store = Path(stores_dir) / f"{slug}-{key[:16]}.zarr"
    if is_complete(store) and not repair_store(store):
        return store
    donors = sorted(Path(stores_dir).glob(f"{slug}-*.zarr"))
    if dask is not None:
        with extraction_cluster(dask, settings.device, spread=model.device_map is not None) as client:
            if client is not None:
                return extract_on_cluster(client, model, records, store, settings, shard_resources(dask, settings),
                                          cache_dir, donors, on_progress)
    loaded = load_model(source, cache_dir, settings.dtype, settings.device, model.trust_remote_code,
                        model.device_map, model.max_memory)
    return extract_to_store(loaded, records, store, settings, on_progress=on_progress, donors=donors)
