"""The attribution store, ATTR.zarr: the estimates of every record, written by shard with the
count store's machinery (`sparcom.extraction.store`: named dims, true layer indices, done flags,
chunk manifest, repair), so it resumes and verifies like a count store (docs/method.md section 6a).

- `attribute_to_store(loaded, records, store, settings, extraction)`: every record's estimates
  into the store. A rerun with the same model, records and settings resumes: finished shards
  are skipped, a finished store is returned as it is, a damaged one recomputes its damaged
  shards. `shards=` restricts one process to some shards.
- `attribute_on_cluster(client, model, records, store, settings, extraction, resources, cache_dir)`:
  the same on a Dask cluster, each worker with its model loaded
  (`sparcom.extraction.distributed.fill_store_on_cluster`).
- `check_attribution(records, where)`: the inputs refused before the model loads (no records, a
  record without a response).
- `open_attribution(path)`: the finished, verified store as an xarray Dataset.

    attribute_to_store(loaded, records, Path("ATTR.zarr"), AttributionSettings(), ExtractionSettings())
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import xarray as xr
from distributed import Client

from sparcom.attribution.estimate import attribute_records, check_responses
from sparcom.attribution.keys import KEY, attribution_key
from sparcom.attribution.schema import (
    ATTRIBUTION_FAMILIES,
    MAX_RESPONSE_TOKENS,
    NLL_DEFINITION,
    NLL_WORDS,
    RESPONSE_TOKENS,
    STORE_KIND,
)
from sparcom.attribution.settings import AttributionSettings
from sparcom.core.models import LoadedModel
from sparcom.curation.records import InstructionRecord, dataset_hash
from sparcom.extraction.architectures import ffn_sites
from sparcom.extraction.distributed import (
    fill_store_on_cluster,
    fill_with_worker_model,
    load_on_workers,
    loaded_alike,
    offering_workers,
)
from sparcom.extraction.extract import (
    ProgressCallback,
    model_attributes,
    shard_progress,
    shard_range,
    shard_windows,
    store_layout,
)
from sparcom.extraction.settings import ExtractionSettings, ModelSettings
from sparcom.extraction.store import (
    COMMAND,
    StoreError,
    check_store_target,
    create_store,
    finalize_store,
    finished_shards,
    finished_store,
    open_store,
    shard_count,
    store_attrs,
    write_shard,
)

COMMAND_LINE = "sparcom attribute"


def check_attribution(records: Sequence[InstructionRecord], where: object) -> None:
    if not records:
        raise ValueError(f"{where}: the dataset holds no records; nothing to attribute")
    check_responses(records)


def attribute_to_store(
    loaded: LoadedModel,
    records: Sequence[InstructionRecord],
    store: Path,
    settings: AttributionSettings,
    extraction: ExtractionSettings,
    shards: Iterable[int] | None = None,
    on_progress: ProgressCallback | None = None,
    finalize: bool = True,
    show_progress: bool = True,
) -> Path:
    """Every record's estimates into `store`; `finalize=False` leaves marking it complete to
    the caller (the cluster's client)."""
    store = Path(store)
    check_attribution(records, store)
    key = attribution_key(loaded.fingerprint, dataset_hash(records), settings, extraction, loaded.dtype)
    check_store_target(store, KEY, STORE_KIND)
    if finished_store(store, key, KEY):
        return store
    if not store.exists():
        _create(store, loaded, records, settings, extraction, key)
    n_shards = shard_count(len(records), extraction.shard_size)
    wanted = sorted(set(range(n_shards) if shards is None else shards) - finished_shards(store))
    with shard_progress(len(records), wanted, extraction.shard_size, "attributing", on_progress,
                        show_progress) as advance:
        for window, indices in shard_windows(wanted, extraction.shard_size, len(records)):
            estimates = attribute_records(loaded, [records[i] for i in indices], settings.max_response_tokens,
                                          extraction, advance)
            position = {i: p for p, i in enumerate(indices)}
            for shard in window:
                rows = [position[i] for i in shard_range(shard, extraction.shard_size, len(records))]
                write_shard(store, shard, {name: estimates[name].values[rows] for name in estimates.data_vars})
    if finalize and len(finished_shards(store)) == n_shards:
        finalize_store(store)
    return store


def _create(store: Path, loaded: LoadedModel, records: Sequence[InstructionRecord], settings: AttributionSettings,
            extraction: ExtractionSettings, key: str) -> None:
    variables, layer_coords = store_layout(ffn_sites(loaded.model))
    names = {family.count: family.attribution for family in ATTRIBUTION_FAMILIES}
    attrs = {**model_attributes(loaded, dataset_hash(records)), KEY: key, COMMAND: COMMAND_LINE,
             "token_span": "response", MAX_RESPONSE_TOKENS: settings.max_response_tokens or 0,
             NLL_DEFINITION: NLL_WORDS}
    create_store(store, records, {names[name]: layout for name, layout in variables.items()}, layer_coords,
                 extraction.shard_size, extraction.layer_chunk, attrs, dtype=np.float32,
                 record_variable=RESPONSE_TOKENS, kind=STORE_KIND)


def _attribute_shards(model: ModelSettings, settings: AttributionSettings, extraction: ExtractionSettings,
                      cache_dir: Path, records: Sequence[InstructionRecord], store: Path, shards: list[int]) -> dict:
    return fill_with_worker_model(model, settings.loading(extraction), cache_dir, shards, lambda loaded: attribute_to_store(
        loaded, records, store, settings, extraction, shards=shards, finalize=False, show_progress=False))


def attribute_on_cluster(
    client: Client,
    model: ModelSettings,
    records: Sequence[InstructionRecord],
    store: Path,
    settings: AttributionSettings,
    extraction: ExtractionSettings,
    resources: dict[str, float],
    cache_dir: Path,
    on_progress: ProgressCallback | None = None,
) -> Path:
    """The store, complete: its missing shards computed in tasks on the workers offering `resources`."""
    check_attribution(records, store)
    store = Path(store).resolve()  # workers may run in other directories
    check_store_target(store, KEY, STORE_KIND)
    workers = offering_workers(client, resources)
    fingerprint, dtype = loaded_alike(load_on_workers(client, model, settings.loading(extraction), cache_dir, workers))
    key = attribution_key(fingerprint, dataset_hash(records), settings, extraction, dtype)
    if finished_store(store, key, KEY):
        return store
    return fill_store_on_cluster(client, records, store, extraction, resources, workers, key, KEY, _attribute_shards,
                                 (model, settings, extraction, Path(cache_dir)), on_progress)


def open_attribution(path: Path) -> xr.Dataset:
    """The finished attribution store (verified against its manifest), coordinates loaded."""
    path = Path(path)
    if not (path / "zarr.json").is_file() or KEY not in store_attrs(path):
        raise StoreError(f"{path}: not an attribution store; write one with `{COMMAND_LINE}`")
    return open_store(path)
