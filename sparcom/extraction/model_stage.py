"""What the stages that run a model over a dataset into a store share: extraction and
attribution (`sparcom.extraction.stage`, `sparcom.attribution.stage`, and the command line's
`extract` and `attribute`) differ only in their checks, their key and how they fill the store.

- `run_model_stage(model, dataset_dir, loading, stores_dir, cache_dir, dask, check, key, on_cluster,
  locally)`: the records loaded and checked before the model loads; the store is named by the
  stage's key (`<model slug>-<key[:16]>.zarr` in `stores_dir`), and a finished one is reused
  without loading the model; otherwise `run_on_model` fills it.
- `run_on_model(model, loading, cache_dir, dask, on_cluster, locally)`: `on_cluster(client,
  resources)` on the cluster `sparcom.core.cluster.extraction_cluster` chooses, or, where it
  chooses none or `dask` is None, `locally(loaded)` with the model loaded in this process.

`loading` is the extraction's settings the stage loads and batches with (its dtype and device).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from distributed import Client

from sparcom.core.cluster import extraction_cluster
from sparcom.core.models import (
    LoadedModel,
    ModelSource,
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
from sparcom.curation.records import InstructionRecord, dataset_hash
from sparcom.extraction.distributed import shard_resources
from sparcom.extraction.settings import ExtractionSettings, ModelSettings
from sparcom.extraction.store import is_complete, repair_store

OnCluster = Callable[[Client, dict[str, float]], Path]  # (client, each shard's worker resources) -> store
Locally = Callable[[LoadedModel], Path]


def run_model_stage(
    model: ModelSettings,
    dataset_dir: Path,
    loading: ExtractionSettings,
    stores_dir: Path,
    cache_dir: Path,
    dask: DaskSettings | None,
    check: Callable[[Sequence[InstructionRecord]], None],
    key: Callable[[str, str, object], str],
    on_cluster: Callable[[Client, dict[str, float], list[InstructionRecord], Path], Path],
    locally: Callable[[LoadedModel, list[InstructionRecord], Path], Path],
) -> Path:
    """`key(fingerprint, data_hash, dtype)`: the stage's key; `on_cluster` and `locally` as in
    `run_on_model`, given the records and the store too."""
    if dask is None or not dask.address:  # a remote cluster's workers check their own devices
        check_device_map(model.device_map, model.max_memory)
    records = load_records(dataset_dir)
    check(records)
    source = resolve_model(model.name, model.revision, model.trust_remote_code)
    dtype = resolve_dtype(loading.dtype, resolve_device(loading.device))
    named = key(model_fingerprint(source, cache_dir), dataset_hash(records), dtype)
    store = Path(stores_dir) / f"{model_slug(model.name)}-{named[:16]}.zarr"
    if is_complete(store) and not repair_store(store):
        return store
    return run_on_model(model, loading, cache_dir, dask,
                        lambda client, resources: on_cluster(client, resources, records, store),
                        lambda loaded: locally(loaded, records, store), source)


def run_on_model(model: ModelSettings, loading: ExtractionSettings, cache_dir: Path, dask: DaskSettings | None,
                 on_cluster: OnCluster, locally: Locally, source: ModelSource | None = None) -> Path:
    """`source`: the model already resolved (else resolved here, only if it loads here)."""
    if dask is not None:
        with extraction_cluster(dask, loading.device, spread=model.device_map is not None) as client:
            if client is not None:
                return on_cluster(client, shard_resources(dask, loading))
    if source is None:
        source = resolve_model(model.name, model.revision, model.trust_remote_code)
    loaded = load_model(source, cache_dir, loading.dtype, loading.device, model.trust_remote_code,
                        model.device_map, model.max_memory)
    return locally(loaded)
