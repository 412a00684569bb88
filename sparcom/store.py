"""The activation-count store: Zarr v3, read with xarray (docs/method.md section 7).

- `create_store(path, ...)`: the empty store, chunked by shard of instructions and by layers.
- `write_shard(path, shard, counts)`: one shard's arrays, then its done flag.
- `finished_shards(path)`, `finalize_store(path)`: resume bookkeeping; the status attribute
  turns "complete" only when every shard is written, so a half-written store is never read.
- `open_store(path)`: the finished store as an xarray Dataset (dask-backed), coordinates loaded.
- `save_zarr(dataset, path)`: any result dataset, with consolidated metadata.

Shards are instruction ranges of exactly one chunk, so writers never share a chunk and separate
processes can fill one store side by side.
"""

from __future__ import annotations

import math
import os
import shutil
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from sparcom.records import InstructionRecord, record_hash

STATUS = "sparcom_status"
PROGRESS = "progress/shard_done"


class StoreError(RuntimeError):
    pass


def shard_count(n_instructions: int, shard_size: int) -> int:
    return math.ceil(n_instructions / shard_size)


# Chunks of about this size: large enough to read fast, small enough for bounded memory.
CHUNK_BYTES = 32 * 2**20


def create_store(
    path: Path,
    records: Sequence[InstructionRecord],
    variables: dict[str, tuple[tuple[str, ...], tuple[int, ...]]],
    layer_coords: dict[str, Sequence[int]],
    shard_size: int,
    layer_chunk: int,
    attrs: dict,
) -> None:
    """An empty store: `variables` maps each count variable to its dims and sizes after
    `instruction`; `layer_coords` gives the true layer index along each layer dimension.

    Written beside the target and renamed into place, so a store is never half-created."""
    path = Path(path)
    n = len(records)
    strings = lambda values: np.array(values, dtype=object)  # noqa: E731 - variable-length strings
    data_vars = {"token_count": (("instruction",), da.zeros(n, dtype=np.uint32, chunks=shard_size))}
    for name, (dims, sizes) in variables.items():
        per_layer_bytes = shard_size * 4 * math.prod(sizes[1:])
        layers = min(layer_chunk, sizes[0], max(1, CHUNK_BYTES // per_layer_bytes))
        data_vars[name] = (("instruction", *dims), da.zeros(
            (n, *sizes), dtype=np.uint32, chunks=(shard_size, layers, *sizes[1:])))
    dataset = xr.Dataset(
        data_vars,
        coords={
            "instruction_id": ("instruction", strings([r.id for r in records])),
            "category": ("instruction", strings([r.category for r in records])),
            "origin": ("instruction", strings([r.origin for r in records])),
            "record_hash": ("instruction", strings([record_hash(r) for r in records])),
            **{dim: (dim, np.asarray(indices, dtype=np.int32)) for dim, indices in layer_coords.items()},
        },
        attrs={**attrs, STATUS: "writing", "shard_size": shard_size},
    )
    partial = path.with_name(f"{path.name}.{os.getpid()}.creating")
    shutil.rmtree(partial, ignore_errors=True)
    dataset.to_zarr(partial, mode="w", compute=False, zarr_format=3, consolidated=False)
    zarr.open_group(partial, mode="r+").create_array(
        PROGRESS, shape=(shard_count(n, shard_size),), chunks=(1,), dtype="uint8", fill_value=0)
    try:
        partial.rename(path)
    except OSError:  # another process created it first: use theirs
        shutil.rmtree(partial, ignore_errors=True)


def store_attrs(path: Path) -> dict:
    return dict(zarr.open_group(path, mode="r").attrs)


def write_shard(path: Path, shard: int, counts: dict[str, np.ndarray]) -> None:
    """Write one shard's arrays (token_count and every count variable), then mark it done."""
    group = zarr.open_group(path, mode="r+")
    start = shard * group.attrs["shard_size"]
    for name, values in counts.items():
        group[name][start:start + len(values)] = values
    group[PROGRESS][shard] = 1


def finished_shards(path: Path) -> set[int]:
    flags = zarr.open_group(path, mode="r")[PROGRESS][:]
    return {int(i) for i in np.flatnonzero(flags)}


def finalize_store(path: Path) -> None:
    group = zarr.open_group(path, mode="r+")
    missing = np.flatnonzero(group[PROGRESS][:] == 0)
    if missing.size:
        raise StoreError(f"{path}: shards {missing.tolist()} are not written yet")
    group.attrs[STATUS] = "complete"
    with _quiet_consolidation():
        zarr.consolidate_metadata(path)


@contextmanager
def _quiet_consolidation():
    """Consolidated metadata lets a plain `xr.open_zarr(path)` open without a warning; zarr
    itself warns only that the v3 spec has not adopted it yet."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Consolidated metadata", category=UserWarning)
        yield


def save_zarr(dataset: xr.Dataset, path: Path) -> Path:
    with _quiet_consolidation():
        dataset.to_zarr(path, mode="w", zarr_format=3, consolidated=True)
    return Path(path)


def is_complete(path: Path) -> bool:
    return Path(path).is_dir() and store_attrs(path).get(STATUS) == "complete"


def open_store(path: Path) -> xr.Dataset:
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise StoreError(f"{path}: not a Zarr store")
    if not is_complete(path):
        raise StoreError(f"{path}: extraction has not finished (rerun it with the same settings to resume)")
    dataset = xr.open_zarr(path, consolidated=True)
    return dataset.assign_coords({name: dataset[name].load() for name in dataset.coords})
