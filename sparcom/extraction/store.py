"""The activation-count store: Zarr v3, read with xarray (docs/method.md section 7).

- `create_store(path, ...)`: the empty store, chunked by shard of instructions and by layers;
  counts (uint32) by default, or per-record values of another type (the attribution store's
  float32 estimates, `sparcom.attribution`), which the same machinery writes, seals and checks.
- `write_shard(path, shard, counts)`: one shard's arrays, then its done flag.
- `finished_shards(path)`, `finalize_store(path)`: resume bookkeeping; the status attribute
  turns "complete" only when every shard is written, so a half-written store is never read.
- `seal_store(path)`, `verify_store(path)`: the chunk manifest written at finish time
  (`sparcom.extraction.integrity`) and its check; a missing or damaged chunk is a StoreError naming the
  shards and their instruction ids, never zeros.
- `damaged_shards(path)`, `reopen_shards(path, shards)`: repair: the damaged shards' chunks are
  removed and their done flags cleared, so a rerun of the extraction recounts only those.
- `check_store_target(path)`: refuses an existing path that is not a count store (or not a
  store of the kind named).
- `finished_store(path, key)`: whether the store is finished for `key` and whole; a store of
  another key is refused, a damaged one reopened (`repair_store`) for its damaged shards.
- `repair_store(path)`: a finished store whose chunks are damaged is reopened for the damaged
  shards only, so a rerun recomputes those.
- `open_store(path)`: the finished, verified store as an xarray Dataset (dask-backed),
  coordinates loaded.
- `save_zarr(dataset, path)`: any result dataset, with consolidated metadata.

Shards are instruction ranges of exactly one chunk, so writers never share a chunk and separate
processes can fill one store side by side.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from sparcom.core.outputs import MARKER, building
from sparcom.curation.records import InstructionRecord, record_hash
from sparcom.extraction.integrity import MANIFEST_NAME, chunk_files, chunk_manifest, expected_chunks, find_damage
from sparcom.extraction.schema import INSTRUCTION, TOKEN_COUNT

STATUS = "sparcom_status"
STORE_KIND = "count store"  # the output marker of stores (sparcom.core.outputs)
PROGRESS = "progress/shard_done"
KEY = "extraction_key"           # the attribute naming what a count store holds
COMMAND = "sparcom_command"      # the attribute naming the command that fills a store (rerun to resume)
SHARD_DTYPES = ("uint32", "float32")  # arrays written by shard; coordinates are strings

log = logging.getLogger(__name__)


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
    dtype: type = np.uint32,
    record_variable: str = TOKEN_COUNT,
    kind: str = STORE_KIND,
) -> None:
    """An empty store: `variables` maps each variable (of `dtype`) to its dims and sizes after
    `instruction`; `layer_coords` gives the true layer index along each layer dimension;
    `record_variable` is the one uint32 number per record (counted or scored tokens).

    Written beside the target and renamed into place, so a store is never half-created."""
    path = Path(path)
    n = len(records)
    strings = lambda values: np.array(values, dtype=object)  # noqa: E731 - variable-length strings
    data_vars = {record_variable: ((INSTRUCTION,), da.zeros(n, dtype=np.uint32, chunks=shard_size))}
    for name, (dims, sizes) in variables.items():
        per_layer_bytes = shard_size * np.dtype(dtype).itemsize * math.prod(sizes[1:])
        layers = min(layer_chunk, sizes[0], max(1, CHUNK_BYTES // per_layer_bytes))
        data_vars[name] = ((INSTRUCTION, *dims), da.zeros(
            (n, *sizes), dtype=dtype, chunks=(shard_size, layers, *sizes[1:])))
    dataset = xr.Dataset(
        data_vars,
        coords={
            "instruction_id": (INSTRUCTION, strings([r.id for r in records])),
            "category": (INSTRUCTION, strings([r.category for r in records])),
            "origin": (INSTRUCTION, strings([r.origin for r in records])),
            "record_hash": (INSTRUCTION, strings([record_hash(r) for r in records])),
            **{dim: (dim, np.asarray(indices, dtype=np.int32)) for dim, indices in layer_coords.items()},
        },
        attrs={**attrs, STATUS: "writing", "shard_size": shard_size},
    )
    with building(path, kind, keep_existing=True) as partial:  # another process's first: theirs
        dataset.to_zarr(partial, mode="w", compute=False, zarr_format=3, consolidated=False)
        zarr.open_group(partial, mode="r+").create_array(
            PROGRESS, shape=(shard_count(n, shard_size),), chunks=(1,), dtype="uint8", fill_value=0)


def check_store_target(path: Path, key: str = KEY, kind: str = STORE_KIND) -> None:
    """Refuse to write into something that exists and is not a store of this kind (its `key` attribute)."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir() or not (path / "zarr.json").is_file() or key not in store_attrs(path):
        raise StoreError(f"{path}: exists and is not a sparcom {kind}; choose another --out")


def finished_store(path: Path, key: str, key_name: str = KEY) -> bool:
    """Whether the store is finished for `key` and whole (a damaged one is reopened for its
    damaged shards: not finished). A store holding another key is refused."""
    path = Path(path)
    if not path.exists():
        return False
    existing = store_attrs(path).get(key_name)
    if existing != key:
        raise StoreError(
            f"{path}: holds results for other settings, model or dataset ({key_name} {existing}); "
            "choose another path or delete it")
    return is_complete(path) and not repair_store(path)


def repair_store(path: Path) -> bool:
    """Reopen the damaged shards of a finished store for a recount; False when it is intact."""
    shards, other = damaged_shards(path)
    if other:
        verify_store(path)  # raises: damage outside the shards cannot be recounted
    if shards:
        log.warning("%s: %s have missing or changed chunks; recounting them", path, describe_shards(path, shards))
        reopen_shards(path, shards)
    return bool(shards)


def store_attrs(path: Path) -> dict:
    return dict(zarr.open_group(path, mode="r").attrs)


def write_shard(path: Path, shard: int, counts: dict[str, np.ndarray]) -> None:
    """Write one shard's arrays (token_count and every count variable), then mark it done."""
    group = zarr.open_group(path, mode="r+")
    start = shard * group.attrs["shard_size"]
    # Every chunk is written, all-zero ones too: a finished store then lacks none, so an absent
    # chunk is always damage (zarr would read it as zeros).
    with zarr.config.set({"array.write_empty_chunks": True}):
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
    absent = {name: keys for name in _shard_arrays(path)
              if (keys := sorted(set(expected_chunks(path, name)) - set(chunk_files(path, name))))}
    if absent:  # lost after its shard was flagged done: recount those shards
        shards = sorted({_shard_of(key) for keys in absent.values() for key in keys})
        reopen_shards(path, shards)
        raise StoreError(f"{path}: chunks of shards {shards} vanished while writing; rerun to recount them")
    seal_store(path)


def seal_store(path: Path) -> None:
    """Finish a fully written store: its chunk manifest (size and CRC-32 of every chunk), then
    the complete status, then consolidated metadata. Also for stores written by other means
    (benchmarks, tests) in this layout."""
    (Path(path) / MANIFEST_NAME).write_text(json.dumps(chunk_manifest(path)), encoding="utf-8")
    zarr.open_group(path, mode="r+").attrs[STATUS] = "complete"
    with _quiet_consolidation():
        zarr.consolidate_metadata(path)


def _shard_arrays(path: Path) -> list[str]:
    """Arrays chunked by shard along `instruction` (every count variable and token_count)."""
    size = store_attrs(path).get("shard_size")  # none: written by other means, not by shard
    names = []
    for meta in Path(path).glob("*/zarr.json"):
        info = json.loads(meta.read_text())
        dims = info.get("dimension_names") or []
        if info.get("node_type") != "array" or dims[:1] != [INSTRUCTION] or info["data_type"] not in SHARD_DTYPES:
            continue  # coordinates (strings) are written once, at creation, not by shard
        if size and info["chunk_grid"]["configuration"]["chunk_shape"][0] == min(size, info["shape"][0]):
            names.append(meta.parent.name)
    return sorted(names)


def _shard_of(key: str) -> int:
    return int(key.split("/")[1])


def damaged_shards(path: Path, full: bool = True) -> tuple[list[int], dict[str, list[str]]]:
    """(shards whose chunks are missing or changed, damaged chunks of arrays not split by shard).

    A store without a manifest (made before manifests existed) cannot be checked: every shard."""
    path = Path(path)
    manifest_file = path / MANIFEST_NAME
    if not manifest_file.is_file():
        return list(range(len(zarr.open_group(path, mode="r")[PROGRESS]))), {}
    damage = find_damage(path, json.loads(manifest_file.read_text()), full)
    by_shard = set(_shard_arrays(path))
    shards = sorted({_shard_of(key) for name, keys in damage.arrays().items() if name in by_shard for key in keys})
    other = {name: keys for name, keys in damage.arrays().items() if name not in by_shard}
    return shards, other


def verify_store(path: Path, full: bool = True) -> None:
    """Raise StoreError unless the finished store holds every chunk of its manifest unchanged."""
    path = Path(path)
    if not is_complete(path):
        raise StoreError(f"{path}: its writing has not finished (rerun it with the same settings to resume)")
    command = store_attrs(path).get(COMMAND, "sparcom extract")
    if not (path / MANIFEST_NAME).is_file():
        raise StoreError(f"{path}: no chunk manifest ({MANIFEST_NAME}), so it cannot be verified; "
                         f"rerun `{command}` with the same settings to recount it")
    shards, other = damaged_shards(path, full)
    if other:
        raise StoreError(f"{path}: damaged store: chunks {other} are missing or changed; "
                         f"it cannot be repaired, delete it and run `{command}` again")
    if shards:
        raise StoreError(f"{path}: damaged store: {describe_shards(path, shards)} have missing or changed "
                         f"chunks; rerun `{command}` with the same settings to recount them")


def describe_shards(path: Path, shards: Sequence[int], limit: int = 4) -> str:
    """'shard 3 (records a, b, c, d)' for the first few shards, with their instruction ids."""
    size = store_attrs(path).get("shard_size", 1)
    try:
        ids = [str(i) for i in zarr.open_group(path, mode="r")["instruction_id"][:]]
    except Exception:  # noqa: BLE001 - the ids themselves may be what is damaged
        ids = []
    parts = []
    for shard in shards[:limit]:
        rows = ids[shard * size:(shard + 1) * size]
        shown = ", ".join(rows[:limit]) + (f", ... ({len(rows)} records)" if len(rows) > limit else "")
        parts.append(f"shard {shard}" + (f" (records {shown})" if rows else ""))
    more = f" and {len(shards) - limit} more shards" if len(shards) > limit else ""
    return "; ".join(parts) + more


def reopen_shards(path: Path, shards: Sequence[int]) -> None:
    """Drop the shards' chunks and done flags, and the store's finished state, for a recount."""
    path = Path(path)
    group = zarr.open_group(path, mode="r+")
    group.attrs[STATUS] = "writing"
    (path / MANIFEST_NAME).unlink(missing_ok=True)
    for name in _shard_arrays(path):
        for key in chunk_files(path, name):
            if _shard_of(key) in set(shards):
                (path / name / key).unlink()
    for shard in shards:
        group[PROGRESS][shard] = 0
    with _quiet_consolidation():
        zarr.consolidate_metadata(path)


@contextmanager
def _quiet_consolidation():
    """Consolidated metadata lets a plain `xr.open_zarr(path)` open without a warning; zarr
    itself warns only that the v3 spec has not adopted it yet (and that the manifest file is
    not a Zarr node, nor the output marker)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Consolidated metadata", category=UserWarning)
        for name in (MANIFEST_NAME, MARKER):
            warnings.filterwarnings("ignore", f"Object at {name} is not recognized", category=UserWarning)
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
    verify_store(path)
    dataset = xr.open_zarr(path, consolidated=True)
    return dataset.assign_coords({name: dataset[name].load() for name in dataset.coords})
