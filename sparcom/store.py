"""The activation-count store: Zarr v3, read with xarray (SPEC section 7).

- `create_store(path, ...)`: the empty store, chunked by shard of instructions and by layers.
- `write_shard(path, shard, act_count, token_count)`: one shard's counts, then its done flag.
- `finished_shards(path)`, `finalize_store(path)`: resume bookkeeping; the status attribute
  turns "complete" only when every shard is written, so a half-written store is never read.
- `open_store(path)`: the finished store as an xarray Dataset (dask-backed), coordinates loaded.
- `save_zarr(dataset, path)`: any result dataset, with consolidated metadata.

Shards are instruction ranges of exactly one chunk, so writers never share a chunk and separate
processes can fill one store side by side.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from sparcom.records import InstructionRecord

STATUS = "sparcom_status"
PROGRESS = "progress/shard_done"


class StoreError(RuntimeError):
    pass


def shard_count(n_instructions: int, shard_size: int) -> int:
    return math.ceil(n_instructions / shard_size)


def create_store(
    path: Path,
    records: Sequence[InstructionRecord],
    n_layers: int,
    n_neurons: int,
    shard_size: int,
    layer_chunk: int,
    attrs: dict,
) -> None:
    n = len(records)
    layer_chunk = min(layer_chunk, n_layers)
    strings = lambda values: np.array(values, dtype=object)  # noqa: E731 - variable-length strings
    dataset = xr.Dataset(
        {
            "act_count": (
                ("instruction", "layer", "neuron"),
                da.zeros((n, n_layers, n_neurons), dtype=np.uint32,
                         chunks=(shard_size, layer_chunk, n_neurons)),
            ),
            "token_count": (("instruction",), da.zeros(n, dtype=np.uint32, chunks=shard_size)),
        },
        coords={
            "instruction_id": ("instruction", strings([r.id for r in records])),
            "category": ("instruction", strings([r.category for r in records])),
            "origin": ("instruction", strings([r.origin for r in records])),
            "layer": ("layer", np.arange(n_layers, dtype=np.int32)),
        },
        attrs={**attrs, STATUS: "writing", "shard_size": shard_size},
    )
    dataset.to_zarr(path, mode="w", compute=False, zarr_format=3, consolidated=False)
    zarr.open_group(path, mode="r+").create_array(
        PROGRESS, shape=(shard_count(n, shard_size),), chunks=(1,), dtype="uint8", fill_value=0)


def store_attrs(path: Path) -> dict:
    return dict(zarr.open_group(path, mode="r").attrs)


def write_shard(path: Path, shard: int, act_count: np.ndarray, token_count: np.ndarray) -> None:
    group = zarr.open_group(path, mode="r+")
    size = group.attrs["shard_size"]
    start = shard * size
    group["act_count"][start:start + len(act_count)] = act_count
    group["token_count"][start:start + len(token_count)] = token_count
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
