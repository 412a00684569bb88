"""The extraction stage as the pipeline runs it (docs/method.md sections 2, 3 and 7).

- `extract_dataset(model, dataset_dir, settings, stores_dir, cache_dir, dask=...)`: the store is
  named by its extraction key, and a finished one is reused without loading the model. Records
  counted before for the same model, span and dtype (in any finished store beside it) are
  copied, so adding ten instructions counts only those ten. With `dask` settings the shards run
  on the cluster `sparcom.core.cluster.extraction_cluster` chooses (`sparcom.extraction.distributed`),
  or in this process (`sparcom.extraction.extract`) where it chooses none; the steps it shares
  with attribution are `sparcom.extraction.model_stage`'s.
"""

from __future__ import annotations

from pathlib import Path

from sparcom.core.models import model_slug
from sparcom.core.settings import DaskSettings
from sparcom.extraction.distributed import extract_on_cluster
from sparcom.extraction.extract import ProgressCallback, check_extraction, extract_to_store
from sparcom.extraction.keys import extraction_key
from sparcom.extraction.model_stage import run_model_stage
from sparcom.extraction.settings import ExtractionSettings, ModelSettings


def extract_dataset(
    model: ModelSettings,
    dataset_dir: Path,
    settings: ExtractionSettings,
    stores_dir: Path,
    cache_dir: Path,
    on_progress: ProgressCallback | None = None,
    dask: DaskSettings | None = None,
) -> Path:
    slug = model_slug(model.name)

    def donors(store: Path) -> list[Path]:  # the stores beside it, whose counted rows it may copy
        return sorted(store.parent.glob(f"{slug}-*.zarr"))

    return run_model_stage(
        model, dataset_dir, settings, stores_dir, cache_dir, dask,
        check=lambda records: check_extraction(records, settings, None, dataset_dir),
        key=lambda fingerprint, data_hash, dtype: extraction_key(fingerprint, data_hash, settings, dtype),
        on_cluster=lambda client, resources, records, store: extract_on_cluster(
            client, model, records, store, settings, resources, cache_dir, donors(store), on_progress),
        locally=lambda loaded, records, store: extract_to_store(
            loaded, records, store, settings, on_progress=on_progress, donors=donors(store),
            dataset_path=dataset_dir))
